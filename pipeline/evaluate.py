"""The evaluate stage's work: centre-crop and 10-crop top-1/top-5 error over the val shards.

Inference runs as a Ray Data `map_batches` over actors that each hold the model, so the
same code scores the sample on a laptop and ImageNet's 50,000 images on a cluster. The
driver only streams back top-5 indices, (B, 5) per crop mode, and counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline import tracking
from pipeline.cluster import init_ray
from pipeline.config import Params
from pipeline.data.preprocess import decode_jpeg
from pipeline.data.shards import ShardMeta, read_shards
from pipeline.eval_report import (
    ClassNames,
    write_confused_pairs,
    write_confusion,
    write_per_class,
    write_worst_classes,
)
from pipeline.plots import plot_confusion, plot_curves
from pipeline.scoring import hits, top_classes
from pipeline.storage import atomic_write_text
from pipeline.train.model_card import ModelCard, load_model
from pipeline.transforms import eval_batch

MODES = ("center", "10crop")  # the centre crop; the paper's ten crops, softmax averaged


class Predictor:
    """Ray Data callable class: JPEG bytes -> top-5 class indices per crop mode."""

    def __init__(self, model_dir: str, ten_crop: bool, threads: int = 2) -> None:
        torch.set_num_threads(threads)
        self.model, self.card = load_model(model_dir)
        self.ten_crop = ten_crop

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [decode_jpeg(b) for b in batch["jpeg"]]
        stats, crop = self.card.stats, self.card.crop
        out = {"label": batch["label"], "key": batch["key"]}
        centre = self.model(eval_batch(images, stats, crop, ten_crop=False))  # (B, C)
        out["top_center"] = top_classes(centre).numpy()
        if self.ten_crop:
            x = eval_batch(images, stats, crop, ten_crop=True)  # (B, 10, 3, c, c)
            out["top_10crop"] = top_classes(average_crops(self.model(x.flatten(0, 1)), 10)).numpy()
        return out


def average_crops(logits: torch.Tensor, crops: int) -> torch.Tensor:
    """The paper's test-time averaging: (B * crops, C) logits, crops of one image adjacent,
    -> (B, C) softmax probabilities averaged over each image's crops."""
    probs = logits.softmax(dim=1)
    return probs.view(-1, crops, probs.shape[1]).mean(dim=1)


@dataclass(frozen=True)
class Scores:
    """What evaluation counted over the val set.

    Attributes:
        metrics: num_images, top1_error, top5_error (centre crop) and, with 10-crop,
            top1_error_10crop, top5_error_10crop.
        confusion: (C, C) int64, rows the true class, columns the headline mode's top-1.
        per_class: (C, 1 + 2 * modes) int64: images, then top-1 and top-5 misses per mode.
        modes: The crop modes counted, in column order.
    """

    metrics: dict[str, Any]
    confusion: np.ndarray
    per_class: np.ndarray
    modes: list[str]


def score(ds, model_dir: str, ten_crop: bool, batch_size: int, num_classes: int) -> Scores:
    """Runs the Predictor over a Ray Dataset of val shards (decode=False) and counts."""
    preds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()), "ten_crop": ten_crop},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    modes = list(MODES if ten_crop else MODES[:1])
    return count(preds.iter_batches(batch_size=None, batch_format="numpy"), num_classes, modes)


def count(batches: Iterable[dict[str, np.ndarray]], num_classes: int, modes: list[str]) -> Scores:
    """Adds up prediction batches as they stream in: memory is the (C, C) counts, whatever
    the number of images.

    Args:
        batches: Each with "label" (B,) and, per mode, "top_<mode>" (B, k) class indices.
        num_classes: C.
        modes: The crop modes in the batches; the last one is the confusion matrix's.

    Raises:
        ValueError: No images.
    """
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    per_class = np.zeros((num_classes, 1 + 2 * len(modes)), dtype=np.int64)  # n, misses per mode
    for batch in batches:
        labels = batch["label"].astype(np.int64)
        np.add.at(per_class[:, 0], labels, 1)
        for i, mode in enumerate(modes):
            hit1, hit5 = hits(batch[f"top_{mode}"], labels)
            np.add.at(per_class[:, 1 + 2 * i], labels, ~hit1)
            np.add.at(per_class[:, 2 + 2 * i], labels, ~hit5)
        headline = batch[f"top_{modes[-1]}"][:, 0]
        np.add.at(confusion, (labels, headline), 1)
    n = int(per_class[:, 0].sum())
    if n == 0:
        raise ValueError("no validation images in the val shards")
    metrics: dict[str, Any] = {"num_images": n}
    for i, mode in enumerate(modes):
        suffix = "" if mode == "center" else f"_{mode}"
        metrics[f"top1_error{suffix}"] = float(per_class[:, 1 + 2 * i].sum() / n)
        metrics[f"top5_error{suffix}"] = float(per_class[:, 2 + 2 * i].sum() / n)
    return Scores(metrics, confusion, per_class, modes)


REPORTS = (  # what write_reports writes into data.plots, all logged to MLflow
    "per_class_error.csv", "worst_classes.csv", "confused_pairs.csv", "confusion.csv", "confusion.png",
    "curves.png",
)  # fmt: skip


def write_reports(plots: Path, result: Scores, classes: ClassNames) -> list[Path]:
    """Writes REPORTS into `plots` (where the train stage wrote train_history.csv).

    Returns:
        Their paths, in REPORTS' order.
    """
    files = {name: plots / name for name in REPORTS}
    write_per_class(files["per_class_error.csv"], result.per_class, result.modes, classes)
    write_worst_classes(files["worst_classes.csv"], result.per_class, result.modes, classes)
    write_confused_pairs(files["confused_pairs.csv"], result.confusion, classes)
    write_confusion(files["confusion.csv"], result.confusion, classes)
    plot_confusion(files["confusion.png"], result.confusion, classes)
    plot_curves(files["curves.png"], plots / "train_history.csv")
    return list(files.values())


def log_to_mlflow(
    run_id: str,
    model: torch.nn.Module,
    card: ModelCard,
    metrics: dict[str, Any],
    files: list[Path],
    registered_model: str,
) -> dict[str, Any]:
    """Adds evaluation results to the training's MLflow run and registers the model.

    The model is logged in MLflow's "pt2" format (torch.export), which loads without
    unpickling code.
    """
    import mlflow
    from mlflow.models import infer_signature

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"eval_{k}": v for k, v in metrics.items()})
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluation")
        example = torch.zeros(2, 3, card.crop, card.crop)  # (B, 3, crop, crop) float32
        with torch.no_grad():
            signature = infer_signature(example.numpy(), model(example).numpy())
        mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pt2",
            input_example=example.numpy(),
            signature=signature,
            # Stated rather than inferred: inference loads the model in a fresh Python to see
            # what it imports, seconds per run; a torch.export model needs torch (and MLflow).
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            registered_model_name=registered_model,
        )
    headline = metrics.get("top1_error_10crop", metrics["top1_error"])
    return tracking.register_model(run_id, registered_model, headline)


def evaluate(params: Params) -> dict[str, Any]:
    """Runs the evaluate stage: scores, reports, plots, MLflow.

    Args:
        params: The validated params (pipeline.config.load_params).

    Returns:
        The metrics written to the eval metrics JSON.
    """
    data, ev = params.data, params.evaluate
    model, card = load_model(data.model)
    tracking.connect()
    tracking.require_not_diverged(card.mlflow_run_id)
    meta = ShardMeta.read(data.shards)

    init_ray()
    ds = read_shards(data.shards, "val", fmt=data.format, decode=False)
    result = score(ds, data.model, ev.ten_crop, ev.batch_size, card.num_classes)
    files = write_reports(Path(data.plots), result, ClassNames(card.classes, meta.names))
    metrics = result.metrics
    registry = log_to_mlflow(card.mlflow_run_id, model, card, metrics, files, params.mlflow.registered_model)
    out = {**metrics, "model_version": registry["version"], "champion": registry["champion"]}
    atomic_write_text(Path(data.eval_metrics), json.dumps(out, indent=1))
    return out
