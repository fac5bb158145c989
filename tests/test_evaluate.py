"""Evaluation scoring against hand-computed values: counts, 10-crop averaging, the CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_params
from pipeline.data.shards import read_shards
from pipeline.data.stats import ColorStats
from pipeline.eval_report import ClassNames, write_confusion, write_per_class
from pipeline.evaluate import average_crops, score
from pipeline.train.model_card import ModelCard, build_network, save_model


def test_ten_crop_averages_softmax_not_logits() -> None:
    # One sure crop for class 1 against nine mild ones for class 0: the mean of the
    # logits says 1, the mean of the softmax says 0.
    logits = torch.tensor([[0.0, 100.0]] + [[1.0, 0.0]] * 9)  # (1 image * 10 crops, 2)
    probs = average_crops(logits, 10)
    assert probs.shape == (1, 2) and int(probs.argmax()) == 0
    assert int(logits.mean(dim=0).argmax()) == 1
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), [1.0], rtol=1e-6)


def test_ten_crop_averages_softmax_not_votes() -> None:
    # Six weak votes for class 0 lose to four sure crops for class 1.
    logits = torch.tensor([[0.0, 100.0]] * 4 + [[0.1, 0.0]] * 6)
    assert int(average_crops(logits, 10).argmax()) == 1


def test_crops_of_each_image_stay_together() -> None:
    sure = {0: [9.0, 0.0], 1: [0.0, 9.0]}
    logits = torch.tensor([sure[0]] * 10 + [sure[1]] * 10)  # image 0 then image 1
    assert average_crops(logits, 10).argmax(dim=1).tolist() == [0, 1]


@pytest.fixture(scope="module")
def constant_model(tiny_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A network whose every weight is 0 and fc8's bias ranks class 1, 2, 0 for any input."""
    params = load_params(tiny_inputs / "params.yaml")
    net = build_network(params.model, 3)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.classifier.fc8.bias.copy_(torch.tensor([0.0, 2.0, 1.0]))
    model_dir = tmp_path_factory.mktemp("model")
    stats = ColorStats.read(str(tiny_inputs / params.data.stats))
    card = ModelCard(params.model, 3, ["a", "b", "c"], params.train.crop, stats, 1, "run", "ray")
    save_model(net.state_dict(), model_dir, card)
    return tiny_inputs / params.data.shards, model_dir


def test_scores_are_the_hand_counts(
    ray_local: None, constant_model: tuple[Path, Path], tmp_path: Path
) -> None:
    shards, model_dir = constant_model
    ds = read_shards(str(shards), "val", fmt="parquet", decode=False)
    labels = np.array([r["label"] for r in ds.take_all()])
    n, per_label = len(labels), np.bincount(labels, minlength=3)
    result = score(ds, str(model_dir), ten_crop=True, batch_size=5, num_classes=3)

    top1 = 1 - per_label[1] / n  # only class 1's images are right
    assert result.metrics == pytest.approx(
        {"num_images": n, "top1_error": top1, "top5_error": 0.0, "top1_error_10crop": top1,
         "top5_error_10crop": 0.0}
    )  # fmt: skip
    assert result.confusion.tolist() == [[0, per_label[c], 0] for c in range(3)]
    assert result.per_class.tolist() == [
        [per_label[c], int(c != 1) * per_label[c], 0, int(c != 1) * per_label[c], 0] for c in range(3)
    ]

    names = ClassNames(["a", "b", "c"], ["A", "B", "C"])
    write_per_class(tmp_path / "pc.csv", result.per_class, result.modes, names)
    with open(tmp_path / "pc.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "label", "wnid", "name", "images", "top1_error_center", "top5_error_center",
        "top1_error_10crop", "top5_error_10crop",
    ]  # fmt: skip
    assert [(r["wnid"], r["name"], r["top1_error_center"], r["top1_error_10crop"]) for r in rows] == [
        ("a", "A", "1.0000", "1.0000"), ("b", "B", "0.0000", "0.0000"), ("c", "C", "1.0000", "1.0000")
    ]  # fmt: skip

    confusion = np.array([[1, 4, 0], [0, 2, 0], [3, 0, 0]])
    write_confusion(tmp_path / "cm.csv", confusion, names)
    with open(tmp_path / "cm.csv") as f:
        cells = [(r["true_wnid"], r["pred_name"], r["images"]) for r in csv.DictReader(f)]
    assert cells == [("a", "B", "4"), ("c", "A", "3"), ("b", "B", "2"), ("a", "A", "1")]
