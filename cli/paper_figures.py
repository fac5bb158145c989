"""The paper report's pictures as PNG bytes: every run's curves on shared axes, the
Figure-1 pair's train error, and the baseline's per-class errors (matplotlib's file-only
Agg backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.plots import png_bytes, pyplot

if TYPE_CHECKING:
    from cli.paper_report import RunResult

TITLES = {
    "train_loss": "train loss",
    "train_top1_error": "train top-1 error",
    "val_top1_error": "val top-1 error (centre crop)",
}


def curves_png(results: list[RunResult], keys: tuple[str, ...]) -> bytes:
    """One panel per metric, every run on it: the same epoch axis in all panels, the same
    error axis (0 to 1) in the error panels, so runs and panels compare at a glance."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), sharex=True)
    for ax, key in zip(axes, keys, strict=True):
        for r in results:
            points = r.curves.get(key, [])
            if points:
                style = "-" if r.status == "finished" else ":"
                ax.plot(*zip(*points, strict=True), style, label=f"{r.ablation.name} ({r.status})")
        ax.set_title(TITLES.get(key, key))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key.endswith("error"):
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return png_bytes(fig, dpi=90)


def figure1_png(relu: RunResult, tanh: RunResult, target: float) -> bytes:
    """Train top-1 error per epoch of the ReLU and the tanh CIFAR net, as the paper's
    Figure 1 draws them (ReLU solid, tanh dashed), with the target error as a line."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for r, style in ((relu, "-"), (tanh, "--")):
        points = r.curves.get("train_top1_error", [])
        if points:
            ax.plot(*zip(*points, strict=True), style, marker=".", label=f"{r.ablation.name} ({r.status})")
    ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"{target:.0%} train error")
    ax.set_title("Figure 1: train top-1 error, CIFAR net")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig, dpi=90)


def per_class_png(per_class: list[dict[str, str]]) -> bytes:
    """The baseline's top-1 error per class (centre crop), worst first."""
    plt = pyplot()
    rows = sorted(per_class, key=lambda r: -float(r["top1_error_center"]))
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1))
    ax.barh([f"{r['wnid']} {r['name'][:24]}" for r in rows], [float(r["top1_error_center"]) for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("val top-1 error (centre crop)")
    ax.set_xlim(0, 1)
    return png_bytes(fig, dpi=90)
