"""The tracking server lost while the train stage runs: a real `mlflow server` (SQLite store)
SIGKILLed once the first epoch is logged. One server serves the module, each test in its own
experiment; a test finding it down (killed by the one before) starts it again.

- Back (same port, same store) while training still runs: training goes on without a worker
  restart, the epochs trained meanwhile are logged once the server answers, each exactly
  once, and the run ends FINISHED.
- Still down when training ends: the stage stops with an error naming the server and the
  epochs it lacks, the run is not marked failed, and the rerun after the server is back
  resumes from the last checkpoint and logs them, each exactly once.
"""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from cli.procs import ProcessRecord, spawn, stop_processes, wait_until
from cli.services import base_env
from pipeline.cluster import free_port
from pipeline.train.checkpoints import checkpoint_dirs
from tests.conftest import PACED_EPOCHS, stage_env


class TrackingServer:
    """`mlflow server` on 127.0.0.1:<port> with a SQLite store in `folder`, which survive a
    kill: start() after kill() is the same server coming back."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.folder, self.port = folder, free_port("127.0.0.1")
        self.uri, self.db = f"http://127.0.0.1:{self.port}", folder / "server.db"
        self.record: ProcessRecord | None = None

    def start(self) -> None:
        argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}"]
        argv += ["--artifacts-destination", str(self.folder / "artifacts")]
        log = self.folder / "server.log"
        proc, self.record = spawn("mlflow", argv, log, base_env(), stop_signal=signal.SIGKILL)
        wait_until(self.healthy, proc, self.record, timeout_s=180)

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.uri}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def kill(self) -> None:
        """SIGKILLs the server and its workers: an outage, not a clean shutdown."""
        stop_processes([self.record])
        assert not self.healthy()

    def query(self, sql: str) -> list[tuple]:
        """Rows from the store itself (readable while the server is down)."""
        with sqlite3.connect(self.db, timeout=30) as conn:
            return conn.execute(sql).fetchall()

    def in_experiment(self, experiment: str, sql: str) -> list[tuple]:
        """`sql`'s rows over the runs of `experiment` only (as table `r`)."""
        runs = (
            "(SELECT runs.* FROM runs JOIN experiments USING (experiment_id) "
            f"WHERE experiments.name = '{experiment}') AS r"
        )
        return self.query(sql.format(runs=runs))

    def logged_steps(self, experiment: str) -> set[int]:
        sql = "SELECT step FROM metrics JOIN {runs} USING (run_uuid) WHERE key = 'val_top1_error'"
        return {s for (s,) in self.in_experiment(experiment, sql)}


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    server = TrackingServer(tmp_path_factory.mktemp("outage") / "tracking")
    server.start()
    yield server
    stop_processes([server.record])


@pytest.fixture
def server(module_server: TrackingServer) -> TrackingServer:
    """The module's server, answering."""
    if not module_server.healthy():
        module_server.start()
    return module_server


def train(ws: Path, uri: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=ws,
        env=stage_env() | {"MLFLOW_TRACKING_URI": uri, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    """Waits for the stage and returns its stderr; a stage still running is Ctrl-C'd."""
    try:
        return proc.communicate(timeout=timeout)[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # lets it stop its own Ray
            proc.communicate(timeout=120)


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Polls `predicate` until true; fails if the stage exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited before {what}:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def checkpointed(ws: Path) -> int:
    """The newest epoch Ray Train has written a checkpoint folder for (0: none yet)."""
    runs = list((ws / "artifacts/checkpoints").glob("alexnet-*"))
    dirs = checkpoint_dirs(runs[0]) if runs else []
    return int(dirs[0].name.split("-")[1]) if dirs else 0


def assert_every_epoch_logged_once(uri: str, ws: Path, epochs: int, experiment: str) -> None:
    """Each per-epoch metric holds steps 1..epochs once, with the values of the stage's own
    history, and the experiment's one run is FINISHED."""
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    with (ws / "plots/train_history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in history] == list(range(1, epochs + 1))
    for key in (k for k in history[0] if k != "epoch"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in logged] == list(range(1, epochs + 1)), f"{key}: steps {[s for s, _ in logged]}"
        assert [v for _, v in logged] == pytest.approx([float(row[key]) for row in history]), key


def test_training_goes_on_through_an_outage_and_logs_every_epoch_once(workspace_copy, server) -> None:
    # Ray Train's controller polling the worker every 1 s (not the stage's 0.2 s) paces the
    # epochs at about 1 s each: 40 epochs outlast the server's restart (~10 s) several times
    # over. Only the report cadence changes; the epochs' work is the same.
    epochs, experiment, pace = 40, "outage", PACED_EPOCHS
    ws = workspace_copy("outage", {"train": {"epochs": epochs}, "mlflow": {"experiment": experiment}})
    proc = train(ws, server.uri, **pace)
    try:
        wait_for(lambda: 1 in server.logged_steps(experiment), proc, "epoch 1 in MLflow")
        server.kill()
        down_at = checkpointed(ws)
        wait_for(lambda: checkpointed(ws) >= down_at + 3, proc, "three epochs trained during the outage")
        unlogged = set(range(1, checkpointed(ws) + 1)) - server.logged_steps(experiment)
        assert len(unlogged) >= 3, f"epochs trained while the server was down: {sorted(unlogged)}"
        server.start()
        assert proc.poll() is None, "training ended before the server was back: raise `epochs`"
    finally:
        err = finish(proc)
    assert proc.returncode == 0, err[-5000:]
    summary = json.loads((ws / "metrics/train.json").read_text())
    assert summary["epochs_run"] == epochs and summary["restarts"] == 0, "the outage restarted the worker"
    assert f"MLflow tracking server {server.uri} does not take metrics" in err
    assert f"MLflow tracking server {server.uri} is back: buffered epochs logged" in err
    assert_every_epoch_logged_once(server.uri, ws, epochs, experiment)


def test_an_outage_at_the_end_stops_clearly_and_the_rerun_logs_the_rest(workspace_copy, server) -> None:
    epochs, experiment = 4, "outage-at-end"
    ws = workspace_copy("outage-at-end", {"train": {"epochs": epochs}, "mlflow": {"experiment": experiment}})
    # The driver's own MLflow calls follow MLflow's retry settings (default: ~4 min of retries).
    fail_fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = train(ws, server.uri, **fail_fast)
    try:
        wait_for(lambda: 1 in server.logged_steps(experiment), proc, "epoch 1 in MLflow")
        server.kill()
    finally:
        err = finish(proc)
    assert proc.returncode != 0
    logged = server.logged_steps(experiment)
    assert set(range(1, epochs + 1)) - logged, "every epoch was logged before the outage"
    # The driver cannot tell which epochs the server holds: it names them all.
    unchecked = list(range(1, epochs + 1))
    expected = f"MLflow tracking server {server.uri} does not answer: the metrics of epochs {unchecked} "
    assert expected in err, err[-5000:]
    assert checkpointed(ws) == epochs, "training did not go on through the outage"
    assert not (ws / "artifacts/model/model.pt").exists(), "outputs written for an incomplete run"
    statuses = server.in_experiment(experiment, "SELECT status FROM {runs}")
    assert statuses == [("RUNNING",)], "the outage marked the run failed"

    server.start()
    rerun = train(ws, server.uri, **fail_fast)
    err = finish(rerun)
    assert rerun.returncode == 0, err[-5000:]
    assert json.loads((ws / "metrics/train.json").read_text())["epochs_run"] == epochs
    assert_every_epoch_logged_once(server.uri, ws, epochs, experiment)
