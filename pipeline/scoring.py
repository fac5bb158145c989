"""Top-1 and top-5 scoring, defined once for training's counts and evaluation's errors."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

TOP_K = 5  # the paper's second metric: the label among the five most probable classes

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def top_classes(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) scores -> (B, min(5, C)) class indices, most probable first."""
    return logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices


def hits(top: Array, labels: Array) -> tuple[Array, Array]:
    """Per-image top-1 and top-5 hits, (B,) bool each.

    Args:
        top: (B, k) class indices from `top_classes` (numpy or torch).
        labels: (B,) true classes, same kind as `top`.
    """
    match = top == labels[:, None]  # (B, k)
    return match[:, 0], match.any(1)
