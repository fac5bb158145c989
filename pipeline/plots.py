"""Evaluation pictures, drawn headless (matplotlib's Agg backend: stages run without a display)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from pipeline.eval_report import ClassNames, class_top1_errors, most_confused
from pipeline.storage import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (stages and reports run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 100) -> bytes:
    """`fig` rendered as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


MATRIX_MAX_CLASSES = 50  # above this a matrix has under ~10 pixels per class: unreadable
PAIRS_SHOWN = 20  # most-confused pairs drawn, one bar each


def confusion_figure(confusion: np.ndarray, classes: ClassNames):
    """The confusion picture, one figure of bounded size at any number of classes: the
    most-confused pairs and the distribution of per-class top-1 error, and beside them the
    row-normalised matrix up to MATRIX_MAX_CLASSES classes.

    Args:
        confusion: (C, C) counts, rows the true class, columns the predicted one.
        classes: Wnids and names of the C classes.

    Returns:
        The matplotlib figure (the caller saves and closes it).
    """
    plt = pyplot()
    matrix = len(classes.wnids) <= MATRIX_MAX_CLASSES
    fig, axes = plt.subplots(1, 2 + matrix, figsize=(6.5 * (2 + matrix), 6))
    if matrix:
        _draw_matrix(axes[0], confusion, classes)
    _draw_pairs(axes[-2], confusion, classes)
    errors = class_top1_errors(confusion)
    errors = errors[~np.isnan(errors)]
    ax = axes[-1]
    ax.hist(errors, bins=20, range=(0, 1))
    ax.axvline(errors.mean(), color="black", linestyle="--", label=f"mean {errors.mean():.1%}")
    ax.set_xlabel("top-1 error of a class")
    ax.set_ylabel("classes")
    ax.set_title(f"per-class top-1 error, {len(errors)} classes")
    ax.legend()
    fig.tight_layout()
    return fig


def _draw_matrix(ax, confusion: np.ndarray, classes: ClassNames) -> None:
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes.wnids))
    ax.set_xticks(ticks, classes.wnids, rotation=90, fontsize=6)
    ax.set_yticks(ticks, [classes.short(c) for c in ticks], fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("val confusion (row-normalised)")


def _draw_pairs(ax, confusion: np.ndarray, classes: ClassNames) -> None:
    pairs = most_confused(confusion, PAIRS_SHOWN)
    labels = [f"{classes.short(t)} -> {classes.short(p)}" for t, p, _ in pairs]
    ax.barh(range(len(pairs)), [n for _, _, n in pairs])
    ax.set_yticks(range(len(pairs)), labels, fontsize=7)
    ax.invert_yaxis()  # most images on top
    ax.set_xlabel("val images (true -> predicted)")
    ax.set_title(f"{len(pairs)} most-confused pairs" if pairs else "no confusions")


def plot_confusion(path: Path, confusion: np.ndarray, classes: ClassNames) -> None:
    """Writes `confusion_figure` as a PNG."""
    atomic_write_bytes(path, png_bytes(confusion_figure(confusion, classes)))


def plot_curves(path: Path, history_csv: Path) -> None:
    """Training curves: loss, and train/val top-1/top-5 error per epoch."""
    plt = pyplot()
    with history_csv.open() as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "val_loss"):
        a.plot(epochs, [float(r[key]) for r in rows], label=key)
    for key in ("train_top1_error", "val_top1_error", "train_top5_error", "val_top5_error"):
        b.plot(epochs, [float(r[key]) for r in rows], label=key)
    a.set_xlabel("epoch"), b.set_xlabel("epoch"), a.legend(), b.legend()
    b.set_ylim(0, 1)
    atomic_write_bytes(path, png_bytes(fig))
