"""The shared recipe: every switch of the paper set (cli.paper.ABLATIONS), tanh included,
learns with the sample profile's lr, warmup and batch, on tiny data, through the real Ray
Train path (`fit`) on the session's local Ray (README "One recipe every switch survives").
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import stages.sample
import stages.shard
import stages.stats
from cli.paper import ABLATIONS
from pipeline.config import SECTIONS, parse_section
from pipeline.data.shards import ShardMeta
from pipeline.data.stats import ColorStats
from pipeline.train.checkpoints import load_state
from pipeline.train.divergence import check_history
from pipeline.train.driver import fit
from pipeline.train.loop import WorkerConfig
from tests.conftest import ROOT, write_params

CLASSES = 3
# Enough images per class to learn in a few epochs at the profile's batch of 64 (9 steps
# an epoch); the model and crop of the tiny profile.
DATA = {
    "sample": {"num_classes": CLASSES, "train_per_class": 192, "val_per_class": 16},
    "shard": {"shard_size": 96},
}
SIZE = {"epochs": 10, "step_size": 7, "crop": 72}  # lr /10 for the last 3 epochs


@pytest.fixture(scope="module")
def learnable(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample, shard and stats stages' outputs, made by the stages' own `main` in this
    process on the session's Ray (three stage processes would each start a Ray of their own)."""
    ws = tmp_path_factory.mktemp("learnable")
    write_params(ws, DATA)
    here = Path.cwd()
    os.chdir(ws)  # the stages read params.yaml and write data/ relative to their cwd
    try:
        for stage in (stages.sample, stages.shard, stages.stats):
            stage.main()
    finally:
        os.chdir(here)
    return ws


def switched(section: str, overrides: tuple[str, ...], base: dict) -> dict:
    """The section's params with the ablation's `section.key=value` overrides."""
    values = dict(base)
    for override in overrides:
        key, value = override.split("=")
        if key.split(".")[0] == section:
            values[key.split(".")[1]] = yaml.safe_load(value)
    return values


@pytest.mark.parametrize("ablation", ABLATIONS, ids=[a.name for a in ABLATIONS])
def test_every_switch_learns_with_the_shared_recipe(
    ray_local, learnable: Path, tmp_path: Path, ablation
) -> None:
    profile = yaml.safe_load((ROOT / "params.yaml").read_text())  # the recipe: lr, warmup, momentum, ...
    assert profile["train"]["warmup_epochs"] > 0, "the shared recipe warms the lr up"
    tiny = yaml.safe_load((learnable / "params.yaml").read_text())
    model = parse_section("model", switched("model", ablation.overrides, {**tiny["model"], "width": 0.25}),
                          SECTIONS["model"])  # fmt: skip
    recipe = {**profile["train"], **SIZE}
    train = parse_section("train", switched("train", ablation.overrides, recipe), SECTIONS["train"])
    # Judged at the last epoch: ten tiny epochs are too few for the profile's "after 5".
    divergence = parse_section("divergence", {"after_epochs": SIZE["epochs"]}, SECTIONS["divergence"])
    meta = ShardMeta.read(str(learnable / "data/shards"))
    stats = ColorStats.read(str(learnable / "data/stats.json"))
    cfg = WorkerConfig(model, train, stats, meta, "parquet", divergence=divergence)

    result = fit(cfg, str(tmp_path), "recipe")
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as d:
        history = load_state(d)["history"]
    assert len(history) == SIZE["epochs"], "a switch stopped early"
    assert check_history(history, CLASSES, divergence) is None
    # Chance is 2/3; over 48 val images its standard error is 0.068, so 0.5 is 2.4 of them
    # below: a network that learnt something, not a lucky draw.
    best = min(h["val_top1_error"] for h in history)
    assert best <= 0.5, f"{ablation.name}: best val top-1 error {best:.2f}, chance {1 - 1 / CLASSES:.2f}"
