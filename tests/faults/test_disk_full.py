"""A full disk under the shard output and under the training checkpoints: a real tmpfs,
mounted over the output folder and shrunk to leave less room than the stage needs.

The stage stops with an error naming the file or checkpoint folder it could not write and
the bytes it needed, before writing a partial one; the previous output (shards, earlier
checkpoints) is intact; once the tmpfs is grown back, the rerun completes (shards: the
same bytes) or resumes (training: from the last checkpoint that fit).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.train.checkpoints import load_state
from tests.conftest import run_stage, stage_env
from tests.faults.common import tree_bytes

MiB = 1 << 20
# The stage's own error line (after the progress bar's last state, on the shard stage).
NO_SPACE = re.compile(r"error: (\S+): no space left to write ([\d,]+) bytes \(([\d,]+) bytes free")


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path, int], None]]:
    """sized(folder, bytes): mounts a tmpfs of that size at folder, or resizes the one there
    (keeping its files); teardown unmounts them."""
    mounted: list[Path] = []

    def sized(folder: Path, size: int) -> None:
        if folder in mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)
            return
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounted.append(folder)

    yield sized
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=True)


def failing_stage(ws: Path, stage: str) -> str:
    """Runs a stage expected to fail; returns its stderr."""
    out = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"], cwd=ws, env=stage_env(), capture_output=True, text=True
    )
    assert out.returncode != 0, f"stage {stage} did not fail:\n{out.stdout[-3000:]}"
    return out.stderr


def used(folder: Path) -> int:
    return shutil.disk_usage(folder).used


def test_shards_on_a_full_disk(workspace_copy, small_disk) -> None:
    ws = workspace_copy("ws", {"data": {"shards": "out/shards"}})
    out = ws / "out"
    small_disk(out, 4 * MiB)
    shutil.copytree(ws / "data/shards", out / "shards")  # the previous run's output, same params
    previous = tree_bytes(out / "shards")
    room = 64 * 1024
    small_disk(out, used(out) + room)  # the new output, staged beside the old one, needs ~400 kB

    stderr = failing_stage(ws, "shard")
    assert (found := NO_SPACE.search(stderr)), stderr[-5000:]
    path, needed, free = found.groups()
    assert path.startswith(f"{out / '.shards.staging'}/") and path.endswith((".parquet", ".tar"))
    assert int(free.replace(",", "")) < int(needed.replace(",", "")) > 0
    assert tree_bytes(out / "shards") == previous

    small_disk(out, 4 * MiB)  # space freed
    run_stage(ws, "shard")  # wipes the failed run's staging folder first
    assert tree_bytes(out / "shards") == previous
    assert not (out / ".shards.staging").exists()


def test_checkpoint_on_a_full_disk(workspace_copy, small_disk) -> None:
    overrides = {"data": {"checkpoints": "ckpt/checkpoints"}, "train": {"epochs": 2, "max_failures": 0}}
    ws = workspace_copy("ws", overrides)
    disk = ws / "ckpt"
    # Room for one checkpoint of the tiny network (about 7 MB of weights and momenta), not two.
    small_disk(disk, 10 * MiB)

    stderr = failing_stage(ws, "train")
    (run,) = (disk / "checkpoints").glob("alexnet-*")
    assert (found := NO_SPACE.search(stderr)), stderr[-5000:]
    path, needed, _ = found.groups()
    assert path == str(run / "epoch-0002")
    assert int(needed.replace(",", "")) > 5 * MiB
    assert load_state(run / "epoch-0001")["epoch"] == 1  # the previous checkpoint intact
    assert not (run / "epoch-0002").exists()  # nothing half-copied

    small_disk(disk, 32 * MiB)  # space freed
    run_stage(ws, "train")
    with open(ws / "plots/train_history.csv") as f:
        history = list(csv.DictReader(f))
    assert [(int(h["epoch"]), int(h["restarts"])) for h in history] == [(1, 0), (2, 1)]  # resumed
    assert json.loads((ws / "metrics/train.json").read_text())["epochs_run"] == 2
    with sqlite3.connect(ws / "mlflow.db") as db:
        steps = db.execute("SELECT step FROM metrics WHERE key = 'val_top1_error' ORDER BY step").fetchall()
    assert steps == [(1,), (2,)]
