"""Ray job submission for real: a local head started with `ray start --head` on 127.0.0.1,
a real `mlflow server`, and the documented `python -m pipeline.submit` command."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
import yaml

from tests.conftest import stage_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Polls `url` until it answers (any HTTP status: Ray's dashboard wants a token);
    fails if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{proc.args[0]} exited: {proc.communicate()[1][-2000:]}"
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.2)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[str]:
    """A real single-node Ray cluster; `--block` ties its processes to this Popen."""
    dash, gcs = free_port(), free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
        ],
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_http(f"{address}/api/version", proc)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def test_submitted_training_job_tracks_run_and_model(
    workspace_copy, ray_head: str, mlflow_server: str, tmp_path: Path
) -> None:
    ws = workspace_copy("cluster")
    # Shards and checkpoints on "shared storage": absolute paths every node can reach.
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for key in ("shards", "stats", "checkpoints", "model", "train_metrics", "eval_metrics", "plots"):
        params["data"][key] = str(ws / params["data"][key])
    params_file = tmp_path / "params-cluster.yaml"
    params_file.write_text(yaml.safe_dump(params))

    env = stage_env() | {"RAY_ADDRESS": ray_head, "MLFLOW_TRACKING_URI": mlflow_server}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.submit", "--params", str(params_file), "train", "evaluate"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout

    summary = json.loads((ws / "metrics/train.json").read_text())
    mlflow.set_tracking_uri(mlflow_server)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["val_top1_error"] >= 0 and "eval_top1_error_10crop" in run.data.metrics
    assert run.data.params["train.epochs"] == "2"
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    version = client.get_model_version_by_alias("alexnet", "candidate")
    assert version.run_id == run.info.run_id
    model = mlflow.pytorch.load_model("models:/alexnet@candidate")
    assert model is not None
