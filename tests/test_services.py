"""The shared services of `cli.services`, for real: moto's S3 server, PostgreSQL 15 and an
`mlflow server` on PostgreSQL with S3 artifacts, all on 127.0.0.1."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import psutil
import psycopg2
import pytest
from mlflow import MlflowClient
from pyarrow import fs as pafs

from cli.procs import stop_processes
from cli.services import ServicesInfo, load_state
from pipeline.preflight import s3_filesystem
from pipeline.tracking import check_tracking_server
from tests.conftest import ROOT


def s3_client(info: ServicesInfo):
    return boto3.client(
        "s3",
        endpoint_url=info.s3.endpoint,
        region_name=info.s3.region,
        aws_access_key_id=info.s3.access_key,
        aws_secret_access_key=info.s3.secret_key,
    )


def mlflow_db(info: ServicesInfo):
    """A connection to MLflow's database as the mlflow role, with its password."""
    pg = info.postgres
    return psycopg2.connect(
        host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=pg.database
    )


def test_pyarrow_writes_and_reads_objects_with_the_env_settings(
    services: ServicesInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in services.env().items():
        monkeypatch.setenv(key, value)
    payload = os.urandom(300_000)
    s3 = s3_filesystem()
    with s3.open_output_stream("alexnet/test/blob.bin") as f:
        f.write(payload)
    # from_uri takes the endpoint and credentials from the same environment.
    fs, path = pafs.FileSystem.from_uri("s3://alexnet/test/blob.bin")
    with fs.open_input_stream(path) as f:
        assert f.read() == payload
    listed = s3_client(services).list_objects_v2(Bucket="alexnet", Prefix="test/")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("test/blob.bin", len(payload))]


def test_mlflow_run_is_stored_in_postgres_with_its_artifact_in_s3(
    services: ServicesInfo, tmp_path: Path, monkeypatch
) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)  # the client needs no S3 credentials: the server proxies artifacts
    client = MlflowClient(tracking_uri=services.mlflow.uri)
    experiment = client.create_experiment("services-single")
    run = client.create_run(experiment)
    run_id = run.info.run_id
    client.log_param(run_id, "train.lr", "0.025")
    for step, loss in enumerate([2.3, 1.7, 1.1]):
        client.log_metric(run_id, "train_loss", loss, step=step)
    (tmp_path / "card.json").write_text('{"arch": "paper"}')
    client.log_artifact(run_id, str(tmp_path / "card.json"))
    client.set_terminated(run_id)

    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    key = f"mlartifacts/{experiment}/{run_id}/artifacts/card.json"
    body = s3_client(services).get_object(Bucket="alexnet", Key=key)["Body"].read()
    assert body == b'{"arch": "paper"}'
    with mlflow_db(services) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("FINISHED",)]
        cur.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("train.lr", "0.025")]
        cur.execute("SELECT step, value FROM metrics WHERE run_uuid = %s ORDER BY step", (run_id,))
        assert cur.fetchall() == [(0, 2.3), (1, 1.7), (2, 1.1)]


def test_two_clients_logging_at_once_make_two_complete_separate_runs(services: ServicesInfo) -> None:
    steps = 25
    experiment = MlflowClient(tracking_uri=services.mlflow.uri).create_experiment("services-concurrent")
    start = threading.Barrier(2, timeout=60)
    run_ids: dict[int, str] = {}
    errors: list[BaseException] = []

    def train(worker: int) -> None:
        try:
            client = MlflowClient(tracking_uri=services.mlflow.uri)
            run_id = client.create_run(experiment, run_name=f"worker-{worker}").info.run_id
            run_ids[worker] = run_id
            client.log_param(run_id, "worker", str(worker))
            start.wait()  # both runs exist: from here the two clients' requests interleave
            for step in range(steps):
                client.log_metric(run_id, "val_top1_error", worker + step / 100, step=step)
            client.set_terminated(run_id)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=train, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    client = MlflowClient(tracking_uri=services.mlflow.uri)
    assert run_ids[0] != run_ids[1]
    for worker, run_id in run_ids.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"worker": str(worker)}
        history = client.get_metric_history(run_id, "val_top1_error")
        assert sorted((m.step, m.value) for m in history) == [(s, worker + s / 100) for s in range(steps)]


def non_loopback_ipv4() -> list[str]:
    """This machine's IPv4 addresses other than loopback, from `ip -4 addr`."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    return [a for a in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out) if not a.startswith("127.")]


def test_services_refuse_connections_on_the_non_loopback_address(services: ServicesInfo) -> None:
    addresses = non_loopback_ipv4()
    assert addresses, "this test needs a non-loopback IPv4 address"
    ports = {
        "s3": int(services.s3.endpoint.rsplit(":", 1)[1]),
        "postgres": services.postgres.port,
        "mlflow": int(services.mlflow.uri.rsplit(":", 1)[1]),
    }
    for name, port in ports.items():
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening on loopback
        for address in addresses:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()
            print(f"{name} on {address}:{port}: refused")


def test_secrets_stay_off_command_lines_and_in_private_files(services: ServicesInfo) -> None:
    secrets = (services.s3.secret_key, services.postgres.password)
    for record in services.processes:
        leader = psutil.Process(record.pid)
        for proc in (leader, *leader.children(recursive=True)):
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.NoSuchProcess:  # exited since the listing (a zombie too): no command line left
                continue
            assert not any(s in cmdline for s in secrets), f"a secret is on the command line of {record.name}"
    assert stat.S_IMODE(services.postgres.passfile.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        assert psutil.Process(services.postgres.process.pid).username() == "nobody"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "cli.services", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_cli_up_writes_private_env_and_down_leaves_nothing(tmp_path: Path) -> None:
    state_dir, env_file = tmp_path / "state", tmp_path / "services.env"
    paths = ["--state-dir", str(state_dir), "--env-file", str(env_file)]
    up = run_cli("up", *paths)
    assert up.returncode == 0, up.stderr[-3000:]
    processes, data = load_state(state_dir / "state.json")
    pids = [q.pid for p in processes for q in (psutil.Process(p.pid), *psutil.Process(p.pid).children(True))]
    env_text = env_file.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:" in env_text
    s3_secret = re.search(r"AWS_SECRET_ACCESS_KEY=(\S+)", env_text).group(1)
    pg_password = (state_dir / "pgpass").read_text().strip().rsplit(":", 1)[1]
    state_text = (state_dir / "state.json").read_text()
    assert s3_secret not in state_text and pg_password not in state_text

    # The sourced settings are all a client needs: S3 with its key, MLflow over HTTP.
    check = (
        "from pipeline.preflight import check_storage; check_storage({'data.shards': 's3://alexnet/s'}); "
        "import os; from pipeline.tracking import check_tracking_server; "
        "check_tracking_server(os.environ['MLFLOW_TRACKING_URI'])"
    )
    sourced = subprocess.run(
        ["bash", "-c", f'source "$1" && exec "{sys.executable}" -c "$2"', "-", str(env_file), check],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sourced.returncode == 0, sourced.stderr[-3000:]

    # A server whose database went away is caught although its /health still answers.
    stop_processes([p for p in processes if p.name == "postgres"])
    tracking_uri = re.search(r"MLFLOW_TRACKING_URI=(\S+)", env_file.read_text()).group(1)
    with pytest.raises(RuntimeError, match="is up but cannot read its backend store"):
        check_tracking_server(tracking_uri)

    down = run_cli("down", *paths)
    assert down.returncode == 0, down.stderr[-3000:]
    assert not [pid for pid in pids if alive(pid)]
    assert not [p for p in data if p.exists()] and not env_file.exists()
    again = run_cli("down", *paths)
    assert again.returncode == 1 and "nothing to stop" in again.stderr
