"""Evaluation pictures, drawn headless (matplotlib's Agg backend: stages run without a display)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

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


def plot_confusion(path: Path, confusion: np.ndarray, classes: list[str]) -> None:
    """Row-normalised confusion matrix image (rows: true class, columns: predicted)."""
    plt = pyplot()
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.4 * len(classes), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 50:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("val confusion (row-normalised)")
    atomic_write_bytes(path, png_bytes(fig))


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
