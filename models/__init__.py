"""Networks of the project: the paper's AlexNet, torchvision's variant, the CIFAR-10 net.

The rest of the project builds models only through :func:`build_model`. The rules of what
combines (`models.rules`) import without torch; the networks load on first use, so a
stage that only validates params never imports them.
"""

from __future__ import annotations

import importlib
from typing import Any

from models.rules import ARCHS, check_switches, crop_range

_LAZY = {
    "AlexNet": "models.alexnet",
    "alexnet": "models.alexnet",
    "paper_lrn": "models.alexnet",
    "build_model": "models.build",
    "input_size": "models.build",
    "load_checkpoint": "models.checkpoint",
    "unwrap": "models.checkpoint",
    "CifarNet": "models.cifar_net",
    "cifar_net": "models.cifar_net",
    "torchvision_alexnet": "models.torchvision_alexnet",
}

__all__ = ["ARCHS", "check_switches", "crop_range", *_LAZY]


def __getattr__(name: str) -> Any:
    """Loads the networks' modules on first access (PEP 562).

    Binds every lazy name at once: importing `models.alexnet` makes the submodule an
    attribute of the package, which the function of the same name must replace.
    """
    if name not in _LAZY:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    for lazy, module in _LAZY.items():
        globals()[lazy] = getattr(importlib.import_module(module), lazy)
    return globals()[name]
