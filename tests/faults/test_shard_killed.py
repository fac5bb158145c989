"""The shard stage killed half-way, over a previous complete output: SIGKILL of the stage's
driver, and separately of the Ray worker process running a shard task.

The previous output stays readable and unchanged while the killed run's staging folder
holds its partial shards; the rerun (driver killed) or the retried task (worker killed)
ends with an output byte-identical to an undisturbed run's. Kills are timed on what is on
disk (a shard file in staging) or running (a worker titled `ray::write_shard`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from cli.procs import ProcessRecord, spawn, stop_processes
from pipeline.data.shards import META, ShardMeta, read_shard_table
from tests.conftest import run_stage, stage_env
from tests.faults.common import tree_bytes

STAGING = "data/.shards.staging"


def assert_readable(ws: Path, expected: dict[str, bytes]) -> None:
    """data/shards is a complete output, the undisturbed one, and its shards read."""
    shards = ws / "data/shards"
    assert tree_bytes(shards) == expected
    meta = ShardMeta.read(str(shards))
    assert sum(read_shard_table(f, "parquet").num_rows for f in meta.files("train", "parquet")) == 48


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[[Path], tuple[subprocess.Popen, ProcessRecord]]]:
    """Starts `python -m stages.shard` in a workspace, in its own process group, which
    teardown stops with whatever the stage left running."""
    records: list[ProcessRecord] = []

    def start(ws: Path) -> tuple[subprocess.Popen, ProcessRecord]:
        argv = [sys.executable, "-m", "stages.shard"]
        proc, record = spawn("shard stage", argv, tmp_path / f"{ws.name}.log", stage_env(), cwd=ws)
        records.append(record)
        return proc, record

    yield start
    stop_processes(records)


def poll(
    condition: Callable[[], object], proc: subprocess.Popen, what: str, timeout_s: float = 180
) -> object:
    """condition()'s first truthy value, polled every 2 ms while the stage runs."""
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert proc.poll() is None, f"the stage ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.002)
    return found


def test_driver_killed_half_way_keeps_the_old_output_and_the_rerun_matches(workspace_copy, started) -> None:
    ws = workspace_copy("ws")
    undisturbed = tree_bytes(ws / "data/shards")  # tiny_inputs' shard run, same params
    proc, _ = started(ws)
    staged = ws / STAGING / "parquet" / "train"
    poll(
        lambda: staged.is_dir() and any(f.suffix == ".parquet" for f in staged.iterdir()),
        proc,
        "a shard staged",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (ws / STAGING / META).exists()  # killed before the new output was complete
    assert_readable(ws, undisturbed)

    run_stage(ws, "shard")
    assert_readable(ws, undisturbed)
    assert not (ws / STAGING).exists()


def shard_task_worker(stage_pid: int) -> psutil.Process | None:
    """A Ray worker process of the stage's own Ray instance now running a shard task."""
    try:
        procs = psutil.Process(stage_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for p in procs:
        try:
            if p.cmdline()[:1] == ["ray::write_shard"]:
                return p
        except psutil.Error:
            continue
    return None


def test_worker_killed_during_a_shard_task_is_retried_to_the_same_output(workspace_copy, started) -> None:
    ws = workspace_copy("ws")
    undisturbed = tree_bytes(ws / "data/shards")
    proc, _ = started(ws)
    worker = poll(lambda: shard_task_worker(proc.pid), proc, "a worker running a shard task")
    os.kill(worker.pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, Path(ws.parent / "ws.log").read_text()[-3000:]
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
    assert_readable(ws, undisturbed)
