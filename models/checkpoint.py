"""Loading saved weights (ours or torchvision's) without unpickling arbitrary code."""

from __future__ import annotations

import os

import torch
from torch import nn

# Key prefixes added by wrappers around the model: DDP (as Ray Train's prepare_model
# applies with several workers) and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    model.load_state_dict(state, strict=True)
    return model
