"""Config validation and small layer factories shared by the networks of this package."""

from __future__ import annotations

import math

from torch import nn

from models.rules import ACTIVATIONS, check_choice, reject


def check_common(*, num_classes: int, activation: str, dropout: float, width: float) -> None:
    """Validates the switches every network of this package takes.

    Args:
        num_classes: Must be an int >= 2.
        activation: One of :data:`ACTIVATIONS`.
        dropout: Drop probability in [0, 1).
        width: Channel multiplier, finite and > 0.

    Raises:
        ValueError: Naming the first bad key, its value and what is allowed.
    """
    if type(num_classes) is not int or num_classes < 2:
        reject("num_classes", num_classes, "an int >= 2")
    check_choice("activation", activation, ACTIVATIONS)
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        reject("dropout", dropout, "a float in [0, 1)")
    if not _is_real(width) or not (math.isfinite(width) and width > 0):
        reject("width", width, "a finite float > 0")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def make_activation(name: str) -> nn.Module:
    """Returns the activation layer for ``name`` (``"relu"`` or ``"tanh"``)."""
    return nn.ReLU(inplace=True) if name == "relu" else nn.Tanh()


def make_pool(pooling: str) -> nn.MaxPool2d:
    """Returns overlapping (3/2, the paper's) or non-overlapping (2/2) max pooling."""
    return nn.MaxPool2d(3, stride=2) if pooling == "overlap" else nn.MaxPool2d(2, stride=2)


def pooled_size(size: int, pooling: str) -> int:
    """Spatial size after :func:`make_pool` (no padding, floor mode)."""
    kernel = 3 if pooling == "overlap" else 2
    return (size - kernel) // 2 + 1


def scale(channels: int, width: float, multiple: int = 1) -> int:
    """Scales a layer width by ``width``, rounding to a positive multiple of ``multiple``.

    Grouped convolutions need in/out channels divisible by ``groups``, hence ``multiple``.
    """
    return max(multiple, round(channels * width / multiple) * multiple)
