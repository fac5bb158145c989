"""The evaluation's reports at ImageNet's 1,000 classes stay readable: synthetic predictions,
no model, no Ray.

10 val images per class; each class's top-1 is right 9 times in 10 and wrong once, on a
seeded random other class (top-5 always right), except the planted confusions: tench ->
goldfish 8 times and the machine crane -> the bird crane 6 times (two synsets that share
the name "crane").
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.report import report
from pipeline.data.sample import load_synsets
from pipeline.eval_report import TOP_K, ClassNames
from pipeline.evaluate import MODES, count, write_reports
from pipeline.plots import confusion_figure
from tests.conftest import ROOT, stage_env

PER_CLASS = 10
PLANTED = {("n01440764", "n01443537"): 8, ("n03126707", "n02012849"): 6}  # (true, predicted): images
PAIR_LABELS = ["tench (n01440764) -> goldfish (n01443537)", "crane (n03126707) -> crane (n02012849)"]


def synthetic_batches(wnids: list[str], batch: int = 500) -> list[dict[str, np.ndarray]]:
    """The module docstring's predictions, as the Predictor streams them: label, top-5 per mode."""
    c = len(wnids)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(c), PER_CLASS)
    top1 = labels.copy()
    wrong = np.arange(0, len(labels), PER_CLASS)  # each class's first image
    top1[wrong] = (labels[wrong] + rng.integers(1, c, len(wrong))) % c
    label_of = {w: i for i, w in enumerate(wnids)}
    for (true, pred), n in PLANTED.items():
        top1[label_of[true] * PER_CLASS : label_of[true] * PER_CLASS + n] = label_of[pred]
    second = np.where(top1 == labels, (labels + 1) % c, labels)  # top-5 always holds the label
    top5 = np.stack([top1, second, *((second + k) % c for k in range(1, 4))], axis=1)  # (N, 5)
    order = rng.permutation(len(labels))  # val's official order interleaves the classes
    labels, top5 = labels[order], top5[order]
    return [
        {"label": labels[i : i + batch], **{f"top_{m}": top5[i : i + batch] for m in MODES}}
        for i in range(0, len(labels), batch)
    ]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, ClassNames]:
    """write_reports' files for the 1,000-class predictions, the metrics, the class names."""
    synsets = load_synsets()
    classes = ClassNames([w for w, _ in synsets], [n for _, n in synsets])
    result = count(synthetic_batches(classes.wnids), len(synsets), list(MODES))
    plots = tmp_path_factory.mktemp("plots")
    history = "epoch,train_loss,val_loss,train_top1_error,val_top1_error,train_top5_error,val_top5_error\n"
    (plots / "train_history.csv").write_text(history + "1,6.9,6.9,0.99,0.99,0.99,0.99\n")
    write_reports(plots, result, classes)
    return plots, result.metrics, classes


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_metrics_are_the_aggregates_only(reports: tuple[Path, dict, ClassNames]) -> None:
    _, metrics, _ = reports
    wrong = 1000 + sum(n - 1 for n in PLANTED.values())  # one per class, planted ones replace it
    assert metrics == pytest.approx({
        "num_images": 10_000, "top1_error": wrong / 10_000, "top5_error": 0.0,
        "top1_error_10crop": wrong / 10_000, "top5_error_10crop": 0.0,
    })  # fmt: skip


def test_tables_are_bounded_and_named_from_the_synset_mapping(reports: tuple[Path, dict, ClassNames]) -> None:
    plots, _, _ = reports
    per_class = read_csv(plots / "per_class_error.csv")  # complete: one row per class
    assert len(per_class) == 1000
    assert (per_class[0]["wnid"], per_class[0]["name"]) == ("n01440764", "tench, Tinca tinca")
    assert per_class[0]["top1_error_10crop"] == "0.8000" and per_class[1]["top1_error_10crop"] == "0.1000"

    worst = read_csv(plots / "worst_classes.csv")
    assert len(worst) == TOP_K
    assert [(r["class"], r["top1_error"]) for r in worst[:2]] == [
        ("tench (n01440764)", "0.8000"), ("crane (n03126707)", "0.6000")
    ]  # fmt: skip
    assert {r["top1_error"] for r in worst[2:]} == {"0.1000"} and worst[2]["class"] == "goldfish (n01443537)"

    pairs = read_csv(plots / "confused_pairs.csv")
    assert len(pairs) == TOP_K
    assert [(r["pair"], r["images"], r["share"]) for r in pairs[:2]] == [
        (PAIR_LABELS[0], "8", "0.8000"), (PAIR_LABELS[1], "6", "0.6000")
    ]  # fmt: skip
    assert {r["images"] for r in pairs[2:]} <= {"1", "2"}

    cells = read_csv(plots / "confusion.csv")  # complete: every non-zero cell, most frequent first
    assert sum(int(r["images"]) for r in cells) == 10_000
    goldfish = "goldfish, Carassius auratus"  # the first class with 9 right: ties go by label
    assert (cells[0]["true_name"], cells[0]["pred_name"], cells[0]["images"]) == (goldfish, goldfish, "9")


def test_confusion_picture_shows_pairs_and_distribution_not_a_matrix(
    reports: tuple[Path, dict, ClassNames],
) -> None:
    plots, _, classes = reports
    width, height = Image.open(plots / "confusion.png").size
    assert width <= 1600 and height <= 700, (width, height)

    confusion = np.zeros((1000, 1000), dtype=np.int64)
    for batch in synthetic_batches(classes.wnids):
        np.add.at(confusion, (batch["label"], batch["top_10crop"][:, 0]), 1)
    fig = confusion_figure(confusion, classes)
    pairs, spread = fig.axes
    assert [t.get_text() for t in pairs.get_yticklabels()[:2]] == PAIR_LABELS
    assert len(pairs.get_yticklabels()) == 20
    counts = [int(p.get_height()) for p in spread.patches]  # classes per error bin of 0.05
    assert sum(counts) == 1000 and max(counts) == 1000 - 2  # every class at 10% but the planted two

    ten = ClassNames(classes.wnids[:10], classes.names[:10])
    assert len(confusion_figure(confusion[:10, :10], ten).axes) == 3  # the matrix beside them


def test_dvc_plots_show_renders_bounded_charts(
    reports: tuple[Path, dict, ClassNames], tmp_path: Path
) -> None:
    plots, _, _ = reports
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path)
    shutil.copytree(plots, tmp_path / "plots")
    env = stage_env()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env=env, check=True)
    out = subprocess.run(
        ["dvc", "plots", "show", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    shown = json.loads(out.stdout)
    assert "errors" not in shown, shown["errors"]
    shown = shown["data"]
    rows = {
        name: plot[0]["content"]["data"]["values"] for name, plot in shown.items() if "content" in plot[0]
    }
    assert set(rows) == {"plots/worst_classes.csv", "plots/confused_pairs.csv", "plots/train_history.csv"}
    assert len(rows["plots/worst_classes.csv"]) == TOP_K
    assert rows["plots/worst_classes.csv"][0]["class"] == "tench (n01440764)"
    assert [r["pair"] for r in rows["plots/confused_pairs.csv"][:2]] == PAIR_LABELS
    images = {name for name, plot in shown.items() if plot[0]["type"] == "image"}
    assert images == {"plots/confusion.png", "plots/curves.png"}


def test_make_run_table_names_the_worst_class_and_pair(
    reports: tuple[Path, dict, ClassNames], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plots, metrics, _ = reports
    shutil.copy(ROOT / "params.yaml", tmp_path)
    shutil.copytree(plots, tmp_path / "plots")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text(json.dumps({**metrics, "model_version": 1}))
    train = {"epochs_run": 1, "images_per_s": 100.0, "mlflow_run_id": "r"}
    (tmp_path / "metrics/train.json").write_text(json.dumps(train))
    monkeypatch.chdir(tmp_path)
    rows = dict(re.split(r"  +", line, maxsplit=1) for line in report().split("\n\n")[0].splitlines())
    assert rows["worst class (10crop)"] == "tench (n01440764): top-1 error 80.00%"
    assert rows["most confused"] == f"{PAIR_LABELS[0]}: 8 val images"
