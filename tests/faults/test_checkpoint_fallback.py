"""The newest training checkpoint truncated or half-written: `newest_valid_checkpoint` falls
back to the newest one that loads, warning with the damaged file's name, and never unpickles
garbage; the train stage resuming a run whose latest checkpoint is truncated goes on from the
one before it. The checkpoints are a real tiny training run's, written by Ray Train."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import warnings
from pathlib import Path

import pytest

from pipeline.train.checkpoints import (
    STATE_FILE,
    checkpoint_dirs,
    checkpoint_name,
    load_state,
    newest_valid_checkpoint,
)
from pipeline.train.runstate import STATE_NAME
from tests.conftest import run_stage, write_params


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory: pytest.TempPathFactory, tiny_inputs: Path) -> Path:
    """A workspace after a finished 3-epoch training (read-only: copy it)."""
    ws = tmp_path_factory.mktemp("checkpoints") / "ws"
    shutil.copytree(tiny_inputs, ws)
    write_params(ws, {"train": {"epochs": 3}})
    run_stage(ws, "train")
    return ws


def run_of(ws: Path) -> Path:
    (run,) = (ws / "artifacts/checkpoints").glob("alexnet-*")
    return run


@pytest.fixture
def run_dir(trained_ws: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run_of(trained_ws).name
    shutil.copytree(run_of(trained_ws), copy)
    return copy


def newest(run_dir: Path) -> tuple[Path | None, list[str]]:
    """newest_valid_checkpoint's folder and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = newest_valid_checkpoint(run_dir)
    return found and found[0], [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_intact_run_gives_its_last_epoch_without_warnings(run_dir: Path) -> None:
    # Ray Train keeps the newest two (CheckpointConfig.num_to_keep=2).
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["epoch-0003", "epoch-0002"]
    assert newest(run_dir) == (run_dir / "epoch-0003", [])


def test_truncated_newest_falls_back_to_the_one_before_naming_it(run_dir: Path) -> None:
    state = run_dir / "epoch-0003" / STATE_FILE
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])  # a copy cut off half-way
    found, warned = newest(run_dir)
    assert found == run_dir / "epoch-0002"
    assert len(warned) == 1 and warned[0].startswith(f"{state}: unreadable checkpoint (")
    assert newest_valid_checkpoint(run_dir)[1]["epoch"] == 2  # what a resume would start from


def test_half_written_and_garbage_checkpoints_are_skipped(run_dir: Path) -> None:
    newest_state = run_dir / "epoch-0003" / STATE_FILE
    newest_state.unlink()  # the folder made, its file not written yet
    older = run_dir / "epoch-0002" / STATE_FILE
    older.write_bytes(b"\x80\x04garbage" * 100)  # overwritten with noise
    found, warned = newest(run_dir)
    assert found is None
    assert [w.split(":")[0] for w in warned] == [str(newest_state), str(older)]
    assert "FileNotFoundError" in warned[0]


def test_a_checkpoint_holding_another_epoch_is_not_trusted(run_dir: Path) -> None:
    # epoch-0003's folder holding epoch 2's state: a mixed-up copy, not what its name says.
    shutil.copyfile(run_dir / "epoch-0002" / STATE_FILE, run_dir / "epoch-0003" / STATE_FILE)
    found, warned = newest(run_dir)
    assert found == run_dir / "epoch-0002"
    assert "not this epoch's state" in warned[0]


def test_a_run_without_checkpoints_gives_none(tmp_path: Path) -> None:
    assert newest(tmp_path / "never-started") == (None, [])
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert newest(tmp_path / "started") == (None, [])


def test_retried_epochs_get_new_folder_names_ordered_after_the_damaged_ones(run_dir: Path) -> None:
    assert checkpoint_name(3, set()) == "epoch-0003"
    assert checkpoint_name(3, {"epoch-0003", "epoch-0003-r1"}) == "epoch-0003-r2"
    shutil.copytree(run_dir / "epoch-0003", run_dir / "epoch-0003-r1")
    (run_dir / "epoch-0003" / STATE_FILE).write_bytes(b"")
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["epoch-0003-r1", "epoch-0003", "epoch-0002"]
    assert newest(run_dir) == (run_dir / "epoch-0003-r1", [])


def test_train_stage_resumes_from_the_one_before_a_truncated_latest(trained_ws: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(trained_ws, ws)
    run = run_of(ws)
    # Killed after its last checkpoint, before the export: the rerun resumes the same run.
    state = json.loads((run / STATE_NAME).read_text())
    (run / STATE_NAME).write_text(json.dumps({**state, "complete": False}))
    damaged = run / "epoch-0003" / STATE_FILE
    damaged.write_bytes(damaged.read_bytes()[:4096])  # a copy cut off

    out = run_stage(ws, "train")
    log = out.stdout + out.stderr
    assert f"{damaged}: unreadable checkpoint (" in log
    assert f"resuming from {run / 'epoch-0002'} (epoch 2) instead of the damaged {run / 'epoch-0003'}" in log
    with open(ws / "plots/train_history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(h["epoch"]) for h in history] == [1, 2, 3]
    assert [int(h["restarts"]) for h in history] == [0, 0, 1]  # only epoch 3 trained again
    assert json.loads((ws / "metrics/train.json").read_text())["epochs_run"] == 3
    assert load_state(run / "epoch-0003-r1")["epoch"] == 3  # the damaged folder's name not reused
    with sqlite3.connect(ws / "mlflow.db") as db:
        steps = db.execute("SELECT step FROM metrics WHERE key = 'val_top1_error' ORDER BY step").fetchall()
    assert steps == [(1,), (2,), (3,)]  # each epoch in MLflow once, across both runs
