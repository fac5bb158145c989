"""The trained model on disk: weights as a plain state_dict plus a JSON card.

The card (`ModelCard`) says how to rebuild the network (model params, classes) and feed
it (crop, normalisation statistics), and which runs made it. The train stage writes it
(`save_model`); evaluation and anyone else read it back (`load_model`). The weights load
with `torch.load(weights_only=True)`, so no code is unpickled.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from models import build_model
from pipeline import jsonfile
from pipeline.config import ModelParams, parse_section
from pipeline.data.stats import ColorStats
from pipeline.storage import atomic_write_bytes, atomic_write_text

WEIGHTS = "model.pt"
CARD = "model.json"


@dataclass(frozen=True)
class ModelCard:
    """What a trained model is and how to use it.

    Attributes:
        arch: The `model` params it was built with.
        num_classes: Outputs.
        classes: Wnids in label order.
        crop: Input side (train.crop): evaluation crops this size.
        stats: The normalisation statistics it was trained with.
        epochs: Epochs trained.
        mlflow_run_id: Its MLflow run (evaluation adds to it).
        ray_run: Its Ray Train run name (checkpoints).
    """

    arch: ModelParams
    num_classes: int
    classes: list[str]
    crop: int
    stats: ColorStats
    epochs: int
    mlflow_run_id: str
    ray_run: str

    def to_json(self) -> str:
        """The card file's text."""
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelCard:
        """Parses a card file's text.

        Raises:
            ValueError: Naming `source` (and the line and column of a JSON syntax error,
                or the key that is missing or malformed).
        """
        raw = jsonfile.parse(text, source)
        jsonfile.check_fields(cls, raw, source, skip=("arch", "stats"))
        try:
            arch = parse_section("model", raw["arch"], ModelParams)
        except ValueError as e:  # ParamsError
            raise ValueError(f"{source}: arch: {e}") from None
        stats = ColorStats.from_dict(raw["stats"], f"{source}: stats")
        if len(raw["classes"]) != raw["num_classes"]:
            raise ValueError(f"{source}: {len(raw['classes'])} classes for num_classes={raw['num_classes']}")
        return cls(**{**raw, "arch": arch, "stats": stats})


def build_network(mp: ModelParams, num_classes: int) -> torch.nn.Module:
    """The network described by the `model` params for `num_classes` outputs."""
    return build_model(**dataclasses.asdict(mp), num_classes=num_classes)


def save_model(state_dict: dict[str, torch.Tensor], out_dir: str | Path, card: ModelCard) -> None:
    """Writes the weights and the card, each atomically."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    atomic_write_bytes(Path(out_dir) / WEIGHTS, buf.getvalue())
    atomic_write_text(Path(out_dir) / CARD, card.to_json())


def load_model(model_dir: str | Path) -> tuple[torch.nn.Module, ModelCard]:
    """Rebuilds the trained network from `save_model` output.

    Returns:
        (model in eval mode, its card).

    Raises:
        FileNotFoundError: No card in `model_dir`.
        ValueError: Naming the file: a malformed card, or weights that are damaged, hold
            anything but tensors, or do not fit the card's network.
    """
    model_dir = Path(model_dir)
    card_path = model_dir / CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path}: no trained model here; run the train stage first")
    card = ModelCard.from_json(card_path.read_text(), str(card_path))
    model = build_network(card.arch, card.num_classes)
    weights = model_dir / WEIGHTS
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # damaged, foreign or not tensors only
        raise ValueError(f"{weights}: not the weights of the network in {card_path}: {e}") from e
    return model.eval(), card
