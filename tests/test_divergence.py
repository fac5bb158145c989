"""Divergence detection: the verdict on an epoch, its params, and a real run that diverges
(stopped early, tagged in MLflow, never exported or registered)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import mlflow
import pytest

from pipeline.config import DivergenceParams, ParamsError, parse_section
from pipeline.train.divergence import check_epoch, check_history
from tests.conftest import NOISE, stage_env

P = DivergenceParams(after_epochs=3, chance_margin=0.02)
CHANCE = math.log(10)


def epoch(i: int, loss: float) -> dict[str, float]:
    return {"epoch": i, "train_loss": loss}


def test_verdicts() -> None:
    assert check_epoch(epoch(1, float("nan")), 10, P).epoch == 1  # NaN counts at once
    assert "inf" in check_epoch(epoch(2, float("inf")), 10, P).reason
    assert check_epoch(epoch(2, CHANCE), 10, P) is None  # at chance, but before after_epochs
    at_chance = check_epoch(epoch(3, 0.99 * CHANCE), 10, P)
    assert at_chance and "still at chance" in at_chance.reason and "ln 10" in at_chance.reason
    assert check_epoch(epoch(3, 0.97 * CHANCE), 10, P) is None  # below (1 - 0.02) ln C: learning
    assert check_epoch(epoch(3, 0.99 * math.log(3)), 3, P) is not None  # ln C of its own C
    off = DivergenceParams(after_epochs=0)
    assert check_epoch(epoch(30, CHANCE), 10, off) is None
    assert check_epoch(epoch(30, float("nan")), 10, off) is not None
    history = [epoch(1, 3.0), epoch(2, 2.3), epoch(3, 2.29), epoch(4, 1.0)]
    assert check_history(history, 10, P).epoch == 3
    assert check_history(history[:2], 10, P) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"after_epochs": -1}, "divergence.after_epochs=-1: expected int with 0 <= value"),
        ({"chance_margin": 0.0}, "divergence.chance_margin=0.0: expected float with 0.0 < value <= 1.0"),
        ({"chance_margin": "x"}, "divergence.chance_margin='x': expected float"),
        ({"patience": 2}, "divergence.patience: unknown key; allowed keys: after_epochs, chance_margin"),
    ],
)
def test_params_are_validated(raw: dict, message: str) -> None:
    with pytest.raises(ParamsError) as e:
        parse_section("divergence", raw, DivergenceParams)
    assert str(e.value) == message


def test_a_diverging_run_stops_early_tagged_and_unregistered_with_a_quiet_console(
    ray_local, workspace_copy
) -> None:
    """With another Ray instance on the machine (ray_local's), where Ray Train's placement
    group cleaner once failed to find its own, and Ray's settings as a user's shell has them."""
    ws = workspace_copy("diverges", {"train": {"epochs": 8, "lr": 10.0}, "divergence": {"after_epochs": 2}})
    cmd = [sys.executable, "-m", "stages.train"]
    # ray_local set these in this process
    ours = ("RAY_AUTH_MODE", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_num_workers_soft_limit")
    env = {k: v for k, v in stage_env().items() if k not in ours}
    out = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 3, out.stderr[-3000:]
    assert "error: training diverged, stopped after epoch" in out.stderr
    assert "Traceback" not in out.stderr.split("error: training diverged")[-1]
    console = out.stdout + out.stderr
    assert [line for line in NOISE if line in console] == []
    progress = r"epoch 1/8  train loss [0-9.naif]+  top-1 error train .* left"
    assert re.search(progress, console), console[-3000:]
    assert not (ws / "artifacts/model/model.pt").exists(), "a diverged model must not be exported"

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["alexnet"], output_format="list")
    assert run.data.tags["diverged"] == "true" and run.info.status == "FAILED"
    stopped = int(run.data.tags["diverged_epoch"])
    assert stopped <= 2 and run.data.tags["diverged_reason"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(1, stopped + 1)), "training must stop after the epoch that showed it"
    assert client.search_registered_models() == []
    # The MLflow UI opens the experiment on its training runs, not MLflow 3's GenAI overview.
    kind = client.get_experiment_by_name("alexnet").tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"

    # The evaluate stage refuses it too, even pointed at a model card of that run.
    from pipeline.tracking import require_not_diverged

    with pytest.raises(RuntimeError, match="diverged in training"):
        require_not_diverged(run.info.run_id)
