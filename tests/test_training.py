"""Ray Train training: the schedule, exact resume after an interruption, and recovery from
a SIGKILLed worker, all through the real train stage on a real local Ray."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from pipeline.data.shards import ShardMeta
from pipeline.scoring import hits, top_classes
from pipeline.train.schedules import PlateauSchedule, StepSchedule
from tests.conftest import run_stage, stage_env, write_params


def test_topk_counts() -> None:
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1]]).repeat(3, 1)  # class 0 ranked first, 5 last
    def counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        h1, h5 = hits(top_classes(logits), labels)
        return int(h1.sum()), int(h5.sum())

    assert counts(logits, torch.tensor([0, 2, 5])) == (1, 2)  # top-1, 3rd, 6th
    assert counts(logits[:, :3], torch.tensor([1, 2, 2])) == (0, 3)  # k = min(5, C)


def test_plateau_schedule_divides_by_ten_then_stops() -> None:
    s = PlateauSchedule(lr=0.01, patience=1, max_reductions=2)
    for err in (0.5, 0.4, 0.4, 0.4):  # best, best, 1 bad (within patience), 2 bad -> /10
        s.step(err)
    assert s.lr == pytest.approx(0.001) and s.reductions == 1 and not s.stop
    for err in (0.4, 0.4):
        s.step(err)
    assert s.lr == pytest.approx(0.0001) and s.reductions == 2
    s.step(0.4)
    s.step(0.4)
    assert s.stop and s.lr == pytest.approx(0.0001)
    restored = PlateauSchedule(lr=1.0, patience=0, max_reductions=0)
    restored.load_state_dict(s.state_dict())
    assert vars(restored) == vars(s)


def test_step_schedule() -> None:
    s = StepSchedule(lr=0.01, step_size=2)
    lrs = []
    for _ in range(5):
        s.step(0.0)
        lrs.append(s.lr)
    assert lrs == pytest.approx([0.01, 0.001, 0.001, 0.0001, 0.0001])


def test_warmup_rises_linearly_per_step_then_hands_over() -> None:
    s = StepSchedule(lr=0.01, step_size=2, warmup_epochs=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    steps = 4  # per epoch
    epoch0 = [s.apply(opt, 0 + (i + 1) / steps) for i in range(steps)]
    assert epoch0 == pytest.approx([0.01 / 8, 0.01 * 2 / 8, 0.01 * 3 / 8, 0.01 * 4 / 8])
    s.step(0.0)
    assert s.apply(opt, 1 + 4 / steps) == pytest.approx(0.01)  # the end of warmup
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    s.step(0.0)
    assert s.apply(opt, 2.25) == pytest.approx(0.001)  # then the step schedule alone
    plateau = PlateauSchedule(lr=0.02, patience=1, max_reductions=1, warmup_epochs=1)
    assert plateau.lr_at(0.5) == pytest.approx(0.01) and plateau.lr_at(1.0) == pytest.approx(0.02)
    restored = StepSchedule(lr=1.0, step_size=1)
    restored.load_state_dict(s.state_dict())
    assert restored.lr_at(0.5) == pytest.approx(s.lr_at(0.5))


def weights(ws: Path) -> dict[str, torch.Tensor]:
    return torch.load(ws / "artifacts/model/model.pt", map_location="cpu", weights_only=True)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Polls `predicate` until true; fails if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited before {what}:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def checkpoints(ws: Path) -> list[Path]:
    return sorted((ws / "artifacts/checkpoints").glob("alexnet-*/epoch-*"))


def registered(ws: Path) -> int:
    """Checkpoints Ray Train's controller has recorded: what a restart resumes from.

    A checkpoint folder on disk is not enough: with 0.2 s epochs two folders were written
    before the controller had recorded the first, and a Ctrl-C then left nothing to resume.
    """
    for snapshot in (ws / "artifacts/checkpoints").glob("alexnet-*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):  # mid-write
            return 0
    return 0


def is_train_worker(process: psutil.Process) -> bool:
    try:
        return "RayTrainWorker" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:  # an idle worker that exited meanwhile
        return False


def start_training(ws: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=ws,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def epoch_steps(ws: Path) -> list[int]:
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["alexnet"], output_format="list")
    assert len(runs) == 1, "a resumed training must continue its MLflow run, not start another"
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "val_top1_error")
    return sorted(m.step for m in history)


def workers(n: int) -> dict:
    """Train params for n workers on the 2-CPU test machine (halves of a core for two)."""
    return {"num_workers": n, "cpus_per_worker": 1.0 if n == 1 else 0.5}


def history(ws: Path) -> list[dict[str, str]]:
    with open(ws / "plots/train_history.csv") as f:
        return list(csv.DictReader(f))


def train_params(n: int) -> dict:
    """8 epochs on n workers, a killed worker restarted up to twice: every run of this module."""
    return {"train": {"epochs": 8, "max_failures": 2, **workers(n)}}


@pytest.fixture(scope="module")
def straight(tiny_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The workspace of an undisturbed training on n workers, trained once per n for the
    module: what an interrupted or a failed run must end equal to."""
    runs: dict[int, Path] = {}

    def get(n: int) -> Path:
        if n not in runs:
            ws = tmp_path_factory.mktemp(f"straight{n}")
            shutil.copytree(tiny_inputs, ws, dirs_exist_ok=True)
            write_params(ws, train_params(n))
            run_stage(ws, "train")
            runs[n] = ws
        return runs[n]

    return get


def assert_same_weights(straight: Path, ws: Path) -> None:
    a, b = weights(straight), weights(ws)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


@pytest.mark.parametrize("n", [1, 2])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(workspace_copy, straight, n: int) -> None:
    ws = workspace_copy("interrupted", train_params(n))
    proc = start_training(ws)
    wait_for(lambda: registered(ws) >= 2, proc, "the second registered checkpoint")
    proc.send_signal(signal.SIGINT)  # a user's Ctrl-C
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (ws / "artifacts/model/model.pt").exists(), "interrupted too late: the run had finished"
    interrupted_at = max(int(p.name.split("-")[1]) for p in checkpoints(ws))
    assert interrupted_at < 8

    run_stage(ws, "train")
    resumed = json.loads((ws / "metrics/train.json").read_text())
    assert resumed["epochs_run"] == 8 and resumed["restarts"] == 1
    assert_same_weights(straight(n), ws)
    assert epoch_steps(ws) == [1, 2, 3, 4, 5, 6, 7, 8]
    # Every image once per epoch, summed over the workers (3 train shards: an uneven split).
    meta = ShardMeta.read(str(ws / "data/shards"))
    for row in history(straight(n)) + history(ws):
        assert int(float(row["train_images"])) == meta.counts["train"]
        assert int(float(row["val_images"])) == meta.counts["val"]
    placements = resumed["worker_nodes"]
    assert len(placements) == 2 and all(len(nodes) == n for nodes in placements)  # 2 attempts


@pytest.mark.parametrize("n", [1, 2])
def test_killed_worker_is_replaced_from_the_last_checkpoint(workspace_copy, straight, n: int) -> None:
    ws = workspace_copy("killed", train_params(n))
    proc = start_training(ws)
    wait_for(lambda: registered(ws) >= 1, proc, "a registered checkpoint")
    # Ray's local processes descend from the stage that started them: never touch another run's.
    train_workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if is_train_worker(p)]
    assert len(train_workers) == n, f"expected {n} Ray Train workers, found {train_workers}"
    os.kill(train_workers[-1].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((ws / "metrics/train.json").read_text())
    assert summary["epochs_run"] == 8
    assert summary["restarts"] == 1, "the worker was not restarted from a checkpoint"
    assert history(ws)[0]["restarts"] == "0", "epoch 1 ran before the kill, in the first attempt"
    assert epoch_steps(ws) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert_same_weights(straight(n), ws)  # the epoch the kill cut short, trained again the same
