"""The evaluation's files, readable at any number of classes.

Two kinds: complete tables for tools (every class's errors, every non-zero confusion
cell: 1,000 rows and up to C^2 cells at ImageNet's size), and bounded ones for people
and `dvc plots` (the TOP_K classes with the highest top-1 error, the TOP_K most-confused
pairs of classes), each row naming its classes by wnid and by the first of the synset
mapping's names, so a 1,000-class evaluation reads like a 10-class one.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.storage import atomic_write_text

TOP_K = 25  # rows of the bounded tables: what a chart or a screen shows legibly


@dataclass(frozen=True)
class ClassNames:
    """Who each class index is.

    Attributes:
        wnids: WordNet ids in label order (CIFAR: class names).
        names: The synset mapping's names in label order ("tench, Tinca tinca").
    """

    wnids: list[str]
    names: list[str]

    def short(self, label: int) -> str:
        """A class as a person reads it: its first name and wnid ("tench (n01440764)");
        the wnid tells apart the synsets that share a first name (two "crane"s)."""
        first = self.names[label].split(",")[0].strip() or self.wnids[label]
        return first if first == self.wnids[label] else f"{first} ({self.wnids[label]})"


def most_confused(confusion: np.ndarray, k: int = TOP_K) -> list[tuple[int, int, int]]:
    """The `k` largest off-diagonal cells of a (C, C) confusion matrix.

    Returns:
        (true label, predicted label, images) triples, most images first, ties by
        (true, predicted); only cells with at least one image.
    """
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    true, pred = np.nonzero(off)
    counts = off[true, pred]
    order = np.lexsort((pred, true, -counts))[:k]  # the last key is the primary one
    return [(int(true[i]), int(pred[i]), int(counts[i])) for i in order]


def class_top1_errors(confusion: np.ndarray) -> np.ndarray:
    """(C,) top-1 error of each class from the confusion matrix's rows; NaN for a class
    without val images."""
    images = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(images > 0, (images - np.diag(confusion)) / images, np.nan)


def write_per_class(path: Path, per_class: np.ndarray, modes: list[str], classes: ClassNames) -> None:
    """Every class's errors, in label order: label, wnid, name, images, then top-1 and
    top-5 error per crop mode (`pipeline.evaluate.Scores.per_class`'s counts)."""
    cols = [f"{k}_error_{m}" for m in modes for k in ("top1", "top5")]
    rates = per_class[:, 1:] / np.maximum(per_class[:, :1], 1)  # (C, 2 * modes)
    rows = [
        [c, classes.wnids[c], classes.names[c], int(per_class[c, 0]), *[f"{v:.4f}" for v in rates[c]]]
        for c in range(len(per_class))
    ]
    _write_csv(path, ["label", "wnid", "name", "images", *cols], rows)


def write_worst_classes(
    path: Path, per_class: np.ndarray, modes: list[str], classes: ClassNames, k: int = TOP_K
) -> None:
    """The `k` classes with the highest top-1 error in the headline crop mode (the last of
    `modes`), highest first, ties by label; classes without val images are left out.
    Columns: class (as `ClassNames.short`), label, wnid, images, top1_error, top5_error, crop."""
    images = per_class[:, 0]
    top1 = per_class[:, len(modes) * 2 - 1] / np.maximum(images, 1)
    top5 = per_class[:, len(modes) * 2] / np.maximum(images, 1)
    scored = np.flatnonzero(images > 0)
    worst = scored[np.lexsort((scored, -top1[scored]))][:k]
    rows = [
        [classes.short(c), c, classes.wnids[c], int(images[c]), f"{top1[c]:.4f}", f"{top5[c]:.4f}", modes[-1]]
        for c in worst.tolist()
    ]
    _write_csv(path, ["class", "label", "wnid", "images", "top1_error", "top5_error", "crop"], rows)


def write_confused_pairs(path: Path, confusion: np.ndarray, classes: ClassNames, k: int = TOP_K) -> None:
    """The `k` most-confused (true, predicted) pairs: pair ("tench (n01440764) -> goldfish
    (n01443537)"), both labels and wnids, images, and share (of the true class's images)."""
    images = confusion.sum(axis=1)
    rows = [
        [f"{classes.short(t)} -> {classes.short(p)}", t, classes.wnids[t], p, classes.wnids[p], n,
         f"{n / images[t]:.4f}"]
        for t, p, n in most_confused(confusion, k)
    ]  # fmt: skip
    _write_csv(path, ["pair", "true_label", "true_wnid", "pred_label", "pred_wnid", "images", "share"], rows)


def write_confusion(path: Path, confusion: np.ndarray, classes: ClassNames) -> None:
    """The confusion matrix's non-zero cells, most frequent first (ties by true, then
    predicted label): true and predicted class (label, wnid, name) and the count of val
    images (the paper report's confusion pairs). At most one row per val image."""
    true, pred = np.nonzero(confusion)
    counts = confusion[true, pred]
    order = np.lexsort((pred, true, -counts))  # the last key is the primary one
    rows = [
        [t, classes.wnids[t], classes.names[t], p, classes.wnids[p], classes.names[p], n]
        for t, p, n in zip(true[order].tolist(), pred[order].tolist(), counts[order].tolist(), strict=True)
    ]
    header = ["true_label", "true_wnid", "true_name", "pred_label", "pred_wnid", "pred_name", "images"]
    _write_csv(path, header, rows)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
