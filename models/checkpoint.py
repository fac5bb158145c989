"""Loading saved weights (ours or torchvision's) without unpickling arbitrary code."""

from __future__ import annotations

import os

import torch
from torch import nn

# Attributes under which wrappers hold the model, outermost first: torch.compile's
# OptimizedModule, then DDP (as Ray Train's prepare_model applies with several workers).
# A wrapped model's state_dict keys carry them as prefixes.
_WRAPPER_ATTRS = ("_orig_mod", "module")
_WRAPPER_PREFIXES = tuple(f"{attr}." for attr in _WRAPPER_ATTRS)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside torch.compile and DDP wrappers, in any nesting (``model`` itself
    if unwrapped)."""
    while attr := next((a for a in _WRAPPER_ATTRS if isinstance(getattr(model, a, None), nn.Module)), None):
        model = getattr(model, attr)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Loads a saved state_dict into ``model`` strictly, on CPU, tensors only.

    Uses ``torch.load(path, map_location="cpu", weights_only=True)``. A prefix that
    DDP or torch.compile put on every key is removed first.

    Args:
        model: Network whose architecture matches the checkpoint.
        path: File written by ``torch.save(model.state_dict(), path)``, e.g. a
            torchvision AlexNet weight file for :func:`models.torchvision_alexnet`.

    Returns:
        ``model``, with the loaded weights.

    Raises:
        RuntimeError: If keys or shapes do not match (strict loading).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    while prefix := _common_prefix(state):
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    model.load_state_dict(state, strict=True)
    return model


def _common_prefix(state: dict[str, torch.Tensor]) -> str | None:
    """The wrapper prefix every key of `state` starts with, if any."""
    return next((p for p in _WRAPPER_PREFIXES if state and all(k.startswith(p) for k in state)), None)
