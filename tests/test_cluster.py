"""Ray job submission for real: a local head started with `ray start --head` on 127.0.0.1,
a real `mlflow server`, and the documented `python -m cli.submit` command."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
import yaml

from cli.submit import shared_params
from pipeline.cluster import free_port
from pipeline.config import load_params
from tests.conftest import stage_env


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


@contextlib.contextmanager
def serving(tool: str, args: list[str], url: str, probe: str) -> Iterator[str]:
    """Runs the venv's `tool` with `args` until the block ends; yields `url` once `url + probe`
    answers. A terminated `--block`ing `ray start` takes its cluster down with it."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / tool), *args],
        env=stage_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as cli.services.base_env
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_http(url + probe, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=120)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact root."""
    port = free_port()
    args = [
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    ]
    with serving("mlflow", args, f"http://127.0.0.1:{port}", "/health") as uri:
        yield uri


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A real single-node Ray cluster started with `ray start --head` on 127.0.0.1.

    Its session lives in its own temp dir, deleted afterwards: the job's pip runtime env
    (the pinned torch, ray, mlflow...) is 6 GB, which Ray keeps until the folder goes.
    The path stays short, since Ray's socket paths must fit in 107 characters.
    """
    dash, gcs, agent, client = free_port(), free_port(), free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-test-"))
    args = [
        "start",
        "--temp-dir",
        str(temp_dir),
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
        # Not the fixed defaults (52365, 10001): other Ray instances on the machine hold them,
        # and a head whose agent cannot listen takes no job ("No available agent").
        "--dashboard-agent-listen-port",
        str(agent),
        "--ray-client-server-port",
        str(client),
        "--num-cpus",
        "2",
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
    ]
    try:
        with serving("ray", args, f"http://127.0.0.1:{dash}", "/api/version") as address:
            yield address
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


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
        [sys.executable, "-m", "cli.submit", "--params", str(params_file), "train", "evaluate"],
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


def test_shared_cwd_makes_the_jobs_relative_data_paths_absolute(tmp_path: Path) -> None:
    given = {"data": {"shards": "out/shards", "raw": "s3://bucket/raw", "stats": "/nfs/stats.json"}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**given, "train": {"lr": 0.02}}))
    staged = tmp_path / "staged.yaml"
    staged.write_text(shared_params(params, Path("/nfs/repo")))
    loaded = load_params(staged)  # still a valid params file
    data = loaded.data
    assert loaded.train.lr == 0.02 and data.shards == "/nfs/repo/out/shards"
    assert (data.raw, data.stats) == ("s3://bucket/raw", "/nfs/stats.json")  # URIs, absolute paths kept
    assert data.checkpoints == "/nfs/repo/artifacts/checkpoints"  # a default, made absolute too
    assert data.format == "parquet" and "format" not in yaml.safe_load(staged.read_text())["data"]
