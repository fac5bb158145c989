"""The trained model on disk: weights as a plain state_dict plus a JSON card.

The card says how to rebuild the network (arch switches, classes) and feed it (crop,
normalisation statistics); the weights load with `torch.load(weights_only=True)`, so no
code is unpickled.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from models import build_model
from pipeline.storage import atomic_write_bytes, atomic_write_text

WEIGHTS = "model.pt"
CARD = "model.json"


def build_from_params(arch: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """The network described by a `model` params section (as a dict) for `num_classes`."""
    arch = dict(arch)
    return build_model(arch.pop("arch"), num_classes=num_classes, **arch)


def save_model(state_dict: dict[str, torch.Tensor], out_dir: str | Path, card: dict[str, Any]) -> None:
    """Writes the weights and the card, each atomically."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    atomic_write_bytes(Path(out_dir) / WEIGHTS, buf.getvalue())
    atomic_write_text(Path(out_dir) / CARD, json.dumps(card, indent=1))


def load_model(model_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuilds the trained network from `save_model` output.

    Returns:
        (model in eval mode, its card: arch, num_classes, classes, crop, stats, run ids).
    """
    model_dir = Path(model_dir)
    card_path = model_dir / CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path}: no trained model here; run the train stage first")
    card = json.loads(card_path.read_text())
    model = build_from_params(card["arch"], card["num_classes"])
    state = torch.load(model_dir / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), card
