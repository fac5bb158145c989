"""Whether a training run has diverged: its loss is not finite, or stays at chance.

A network that predicts the uniform distribution over C classes has cross-entropy ln C,
so a train loss still near ln C after a few epochs means it learnt nothing (typically
dead ReLUs or saturated units after too large first steps). The worker stops such a run
after the epoch that shows it; the driver judges the same history again and refuses to
export it (same function, same verdict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import DivergenceParams


class TrainingDiverged(RuntimeError):
    """A training run stopped because it diverged (the message says how and what to try)."""


@dataclass(frozen=True)
class Divergence:
    """Why a run counts as diverged.

    Attributes:
        epoch: The (1-based) epoch that showed it.
        reason: One line: the loss, the threshold it failed.
    """

    epoch: int
    reason: str


def check_epoch(metrics: dict[str, float], num_classes: int, p: DivergenceParams) -> Divergence | None:
    """Judges one epoch's metrics (`epoch`, `train_loss`).

    Args:
        metrics: The epoch's metrics, as the training loop reports them.
        num_classes: C; chance loss is ln C.
        p: The thresholds.

    Returns:
        The divergence, or None when the epoch is fine.
    """
    epoch, loss = int(metrics["epoch"]), float(metrics["train_loss"])
    if not math.isfinite(loss):
        return Divergence(epoch, f"train loss is {loss} at epoch {epoch}")
    chance = math.log(num_classes)
    ceiling = (1 - p.chance_margin) * chance
    if p.after_epochs and epoch >= p.after_epochs and loss >= ceiling:
        return Divergence(
            epoch,
            f"train loss {loss:.4f} at epoch {epoch} is still at chance: >= {ceiling:.4f} "
            f"({1 - p.chance_margin:g} x ln {num_classes} = {chance:.4f}; divergence.after_epochs="
            f"{p.after_epochs}, divergence.chance_margin={p.chance_margin:g})",
        )
    return None


def check_history(
    history: list[dict[str, float]], num_classes: int, p: DivergenceParams
) -> Divergence | None:
    """The first diverged epoch of a run's history, or None."""
    for metrics in history:
        verdict = check_epoch(metrics, num_classes, p)
        if verdict:
            return verdict
    return None
