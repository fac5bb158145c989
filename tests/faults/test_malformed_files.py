"""The pipeline's own files damaged between stages: stats.json, meta.json, the model card and
its weights, truncated or edited into the wrong shape. Each reader fails with the file, and
the key or (for JSON syntax) the line and column; a stage stops before any work; rerunning
the stage that writes the file recovers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelParams
from pipeline.data.shards import META, ShardMeta
from pipeline.data.stats import ColorStats
from pipeline.train.model_card import CARD, WEIGHTS, ModelCard, build_network, load_model, save_model
from tests.conftest import run_stage, stage_env
from tests.faults.common import STATS


def edited(text: str, edit) -> str:
    """The JSON `text` with `edit` applied to its object."""
    raw = json.loads(text)
    edit(raw)
    return json.dumps(raw, indent=1)


def truncated(text: str) -> tuple[str, int, int]:
    """`text` cut after its fourth line, as a full disk or a killed writer leaves it, with
    the line and column json stops at (the end of the cut text)."""
    cut = "".join(text.splitlines(keepends=True)[:4])
    return cut, cut.count("\n") + 1, 1


def syntax_message(path: Path, line: int, column: int) -> str:
    return re.escape(f"{path}: invalid JSON at line {line} column {column}: ")


# --- stats.json (the stats stage's output) ---------------------------------------------

STATS_DAMAGE = {
    "missing-eigvec": (lambda r: r.pop("eigvec"), r"missing key 'eigvec'"),
    "two-channel-mean": (
        lambda r: r.update(mean=[0.5, 0.5]),
        re.escape("mean=[0.5, 0.5]: expected tuple[float, float, float]"),
    ),
    "eigvec-2x3": (lambda r: r["eigvec"].pop(), r"eigvec=.*: expected tuple\[tuple\[float, float, float\]"),
    "cov-two-rows": (lambda r: r["cov"].pop(), r"cov: expected 3 rows, got 2"),
    "nan-std": (lambda r: r.update(std=[0.2, float("nan"), 0.2]), r"std=\[0.2, NaN, 0.2\]: expected"),
    "zero-std": (
        lambda r: r.update(std=[0.2, 0.0, 0.2]),
        re.escape("std=[0.2, 0.0, 0.2]: expected values > 0"),
    ),
    "string-mean": (lambda r: r.update(mean="0.5 0.5 0.5"), r"mean=\"0.5 0.5 0.5\": expected tuple"),
    "count-as-text": (lambda r: r.update(num_images="48"), r"num_images=\"48\": expected int"),
    "unknown-key": (lambda r: r.update(median=[0.5, 0.5, 0.5]), r"unknown key 'median'"),
}


@pytest.mark.parametrize("damage", list(STATS_DAMAGE))
def test_stats_file_of_the_wrong_shape_names_file_and_key(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "stats.json"
    edit, message = STATS_DAMAGE[damage]
    path.write_text(edited(STATS.to_json(), edit))
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + message):
        ColorStats.read(str(path))


def test_stats_file_syntax_errors_name_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    STATS.write(str(path))
    assert ColorStats.read(str(path)) == STATS  # the writer's file reads back whole
    cut, line, column = truncated(path.read_text())
    path.write_text(cut)
    with pytest.raises(ValueError, match=syntax_message(path, line, column) + "Expecting"):
        ColorStats.read(str(path))
    path.write_text('{\n "mean": [0.5, 0.5, 0.5],\n "std": [0.2, 0.2 0.2]\n}')  # a hand edit
    with pytest.raises(ValueError, match=syntax_message(path, 3, 19) + "Expecting ',' delimiter"):
        ColorStats.read(str(path))
    path.write_bytes(b"")  # the writer killed before its first byte, were writes not atomic
    with pytest.raises(ValueError, match=syntax_message(path, 1, 1) + "Expecting value"):
        ColorStats.read(str(path))
    path.write_bytes(b'{"mean": "\xff"}')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not UTF-8 text")):
        ColorStats.read(str(path))
    path.write_text("[0.5, 0.5, 0.5]")
    with pytest.raises(ValueError, match=re.escape(f"{path}: expected a JSON object, got list")):
        ColorStats.read(str(path))


def test_train_stage_stops_on_a_damaged_stats_file_and_the_stats_rerun_recovers(workspace_copy) -> None:
    ws = workspace_copy("damaged-stats")
    stats = ws / "data/stats.json"
    good = stats.read_text()
    stats.write_text(good[: len(good) // 2])
    out = subprocess.run(
        [sys.executable, "-m", "stages.train"],
        cwd=ws,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"ValueError: data/stats\.json: invalid JSON at line \d+ column \d+: .+", last), last
    assert not (ws / "artifacts").exists() and not (ws / "mlflow.db").exists(), "work started"
    run_stage(ws, "stats")
    assert stats.read_text() == good and ColorStats.read(str(stats)).num_images > 0


# --- meta.json (the shard stage's manifest) ----------------------------------------------

META_DAMAGE = {
    "missing-shards": (lambda r: r.pop("shards"), r"missing key 'shards'"),
    "classes-as-text": (
        lambda r: r.update(classes="n01440764"),
        r"classes=\"n01440764\": expected list\[str\]",
    ),
    "count-as-text": (lambda r: r["counts"].update(train="48"), r"counts=.*: expected dict\[str, int\]"),
    "shard-list-as-text": (
        lambda r: r["shards"]["parquet"].update(train="part-00000.parquet"),
        r"shards=.*: expected dict\[str, dict\[str, list\[str\]\]\]",
    ),
    "names-short": (lambda r: r["names"].pop(), r"2 names for 3 classes"),
    "unknown-format": (
        lambda r: r["shards"].update(csv={}),
        r"format='both', shards in \['csv', 'parquet', 'webdataset'\]",
    ),
    "size-as-float": (lambda r: r.update(size=80.5), r"size=80.5: expected int"),
    "sizes-short": (lambda r: r["sizes"]["train"].pop(), r"sizes\.train does not count the \d+ \w+ shards"),
}


@pytest.mark.parametrize("damage", list(META_DAMAGE))
def test_shard_meta_of_the_wrong_shape_names_file_and_key(
    tiny_inputs: Path, tmp_path: Path, damage: str
) -> None:
    good = (tiny_inputs / "data/shards" / META).read_text()  # the shard writer's own output
    assert ShardMeta.read(str(tiny_inputs / "data/shards")).classes
    edit, message = META_DAMAGE[damage]
    (tmp_path / META).write_text(edited(good, edit))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / META}: ") + message):
        ShardMeta.read(str(tmp_path))


def test_shard_meta_syntax_errors_name_line_and_column(tiny_inputs: Path, tmp_path: Path) -> None:
    cut, line, column = truncated((tiny_inputs / "data/shards" / META).read_text())
    (tmp_path / META).write_text(cut)
    with pytest.raises(ValueError, match=syntax_message(tmp_path / META, line, column)):
        ShardMeta.read(str(tmp_path))


# --- model.json and model.pt (the train stage's model) ----------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model folder written by the train stage's writer, for a tiny network."""
    arch = ModelParams(width=0.125, init="kaiming")
    card = ModelCard(arch, 3, ["n1", "n2", "n3"], 72, STATS, 2, "0123abcd", "alexnet-0123")
    out = tmp_path / "model"
    save_model(build_network(arch, 3).state_dict(), out, card)
    assert load_model(out)[1] == card
    return out


CARD_DAMAGE = {
    "missing-crop": (lambda r: r.pop("crop"), r"missing key 'crop'"),
    "crop-as-text": (lambda r: r.update(crop="72"), r"crop=\"72\": expected int"),
    "classes-short": (lambda r: r["classes"].pop(), r"2 classes for num_classes=3"),
    "arch-typo": (lambda r: r["arch"].update(widht=0.5), r"arch: model\.widht: unknown key"),
    "arch-bad-value": (lambda r: r["arch"].update(groups=3), r"arch: model\.groups=3: expected one of 1, 2"),
    "stats-two-channels": (lambda r: r["stats"].update(std=[0.2, 0.2]), r"stats: std=\[0.2, 0.2\]: expected"),
    "stats-not-object": (lambda r: r.update(stats=[1, 2, 3]), r"stats: expected a JSON object, got list"),
}


@pytest.mark.parametrize("damage", list(CARD_DAMAGE))
def test_model_card_of_the_wrong_shape_names_file_and_key(model_dir: Path, damage: str) -> None:
    card = model_dir / CARD
    edit, message = CARD_DAMAGE[damage]
    card.write_text(edited(card.read_text(), edit))
    with pytest.raises(ValueError, match=re.escape(f"{card}: ") + message):
        load_model(model_dir)


def test_model_card_syntax_errors_name_line_and_column(model_dir: Path) -> None:
    card = model_dir / CARD
    cut, line, column = truncated(card.read_text())
    card.write_text(cut)
    with pytest.raises(ValueError, match=syntax_message(card, line, column)):
        load_model(model_dir)


def test_damaged_or_mismatched_weights_name_the_file(model_dir: Path, tmp_path: Path) -> None:
    weights = model_dir / WEIGHTS
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not the weights of the network in ")):
        load_model(model_dir)
    other = tmp_path / "other.pt"
    torch.save(build_network(ModelParams(width=0.25, init="kaiming"), 3).state_dict(), other)
    shutil.copyfile(other, weights)  # a wider network's weights next to this card
    with pytest.raises(ValueError, match=re.escape(f"{weights}: ") + r"[\s\S]*size mismatch"):
        load_model(model_dir)
    weights.write_bytes(good)
    assert load_model(model_dir)[0] is not None  # the rewritten file loads again
