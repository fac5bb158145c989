"""The evaluate stage's work: centre-crop and 10-crop top-1/top-5 error over the val shards.

Inference runs as a Ray Data `map_batches` over actors that each hold the model, so the
same code scores the sample on a laptop and ImageNet's 50,000 images on a cluster. The
driver only streams back top-5 indices, (B, 5) per crop mode, and counts.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline import tracking
from pipeline.cluster import init_ray
from pipeline.data.preprocess import decode_jpeg
from pipeline.data.shards import read_meta, read_shards
from pipeline.storage import atomic_write_bytes, atomic_write_text
from pipeline.tracking import register_model
from pipeline.train.model_card import load_model
from pipeline.transforms import ColorStats, eval_batch


class Predictor:
    """Ray Data callable class: JPEG bytes -> top-5 class indices for centre and 10-crop."""

    def __init__(self, model_dir: str, ten_crop: bool, threads: int = 2) -> None:
        torch.set_num_threads(threads)
        self.model, card = load_model(model_dir)
        self.stats = ColorStats(**card["stats"])
        self.crop = card["crop"]
        self.ten_crop = ten_crop
        self.k = min(5, card["num_classes"])

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [decode_jpeg(b) for b in batch["jpeg"]]
        out = {"label": batch["label"], "key": batch["key"]}
        centre = self.model(eval_batch(images, self.stats, self.crop, ten_crop=False))  # (B, C)
        out["top_center"] = centre.topk(self.k, dim=1).indices.numpy()
        if self.ten_crop:
            x = eval_batch(images, self.stats, self.crop, ten_crop=True)  # (B, 10, 3, c, c)
            probs = self.model(x.flatten(0, 1)).softmax(dim=1)  # (B*10, C)
            avg = probs.view(x.shape[0], 10, -1).mean(dim=1)  # softmax averaged over crops
            out["top_ten"] = avg.topk(self.k, dim=1).indices.numpy()
        return out


def _errors(top: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image top-1 and top-5 misses (bool arrays) from (N, k) indices."""
    hits = top == labels[:, None]
    return ~hits[:, 0], ~hits.any(axis=1)


def score(ds, model_dir: str, ten_crop: bool, batch_size: int, num_classes: int) -> dict[str, Any]:
    """Runs the Predictor over a Ray Dataset of val shards (decode=False) and counts.

    Returns:
        {"metrics": {...}, "confusion": (C, C) int64 rows=true, "per_class": (C, 4) misses}.
    """
    preds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()), "ten_crop": ten_crop},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    modes = ["center", "ten"] if ten_crop else ["center"]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    per_class = np.zeros((num_classes, 1 + 2 * len(modes)), dtype=np.int64)  # n, misses per mode
    for batch in preds.iter_batches(batch_size=None, batch_format="numpy"):
        labels = batch["label"].astype(np.int64)
        np.add.at(per_class[:, 0], labels, 1)
        for i, mode in enumerate(modes):
            miss1, miss5 = _errors(batch[f"top_{mode}"], labels)
            np.add.at(per_class[:, 1 + 2 * i], labels, miss1)
            np.add.at(per_class[:, 2 + 2 * i], labels, miss5)
        headline = batch[f"top_{modes[-1]}"][:, 0]
        np.add.at(confusion, (labels, headline), 1)
    n = int(per_class[:, 0].sum())
    if n == 0:
        raise ValueError("no validation images in the val shards")
    metrics: dict[str, Any] = {"num_images": n}
    for i, mode in enumerate(modes):
        suffix = "" if mode == "center" else "_10crop"
        metrics[f"top1_error{suffix}"] = float(per_class[:, 1 + 2 * i].sum() / n)
        metrics[f"top5_error{suffix}"] = float(per_class[:, 2 + 2 * i].sum() / n)
    return {"metrics": metrics, "confusion": confusion, "per_class": per_class, "modes": modes}


def write_per_class(
    path: Path, per_class: np.ndarray, modes: list[str], classes: list[str], names: list[str]
) -> None:
    """Per-class error CSV: wnid, name, images, then top-1/top-5 error per crop mode."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = [f"{k}_error_{m}" for m in modes for k in ("top1", "top5")]
    writer.writerow(["label", "wnid", "name", "images", *cols])
    for c, row in enumerate(per_class):
        n = max(int(row[0]), 1)
        writer.writerow([c, classes[c], names[c], int(row[0]), *[f"{v / n:.4f}" for v in row[1:]]])
    atomic_write_text(path, buf.getvalue())


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (stages run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_confusion(path: Path, confusion: np.ndarray, classes: list[str]) -> None:
    """Row-normalised confusion matrix image (rows: true class, columns: predicted)."""
    plt = _pyplot()
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.4 * len(classes), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 50:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("val confusion (row-normalised)")
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)


def plot_curves(path: Path, history_csv: Path) -> None:
    """Training curves: loss, and train/val top-1/top-5 error per epoch."""
    plt = _pyplot()
    with history_csv.open() as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "val_loss"):
        a.plot(epochs, [float(r[key]) for r in rows], label=key)
    for key in ("train_top1_error", "val_top1_error", "train_top5_error", "val_top5_error"):
        b.plot(epochs, [float(r[key]) for r in rows], label=key)
    a.set_xlabel("epoch"), b.set_xlabel("epoch"), a.legend(), b.legend()
    b.set_ylim(0, 1)
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)


def log_to_mlflow(
    run_id: str,
    model: torch.nn.Module,
    card: dict[str, Any],
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
        example = torch.zeros(2, 3, card["crop"], card["crop"])  # (B, 3, crop, crop) float32
        with torch.no_grad():
            signature = infer_signature(example.numpy(), model(example).numpy())
        mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pt2",
            input_example=example.numpy(),
            signature=signature,
            registered_model_name=registered_model,
        )
    headline = metrics.get("top1_error_10crop", metrics["top1_error"])
    return register_model(run_id, registered_model, headline)


def evaluate(params: dict[str, Any]) -> dict[str, Any]:
    """Runs the evaluate stage: scores, reports, plots, MLflow.

    Args:
        params: Every validated params section (pipeline.config.load_params).

    Returns:
        The metrics written to the eval metrics JSON.
    """
    import mlflow

    data, ev = params["data"], params["evaluate"]
    model, card = load_model(data.model)
    uri = tracking.tracking_uri()
    tracking.check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    meta = read_meta(data.shards)

    init_ray()
    ds = read_shards(data.shards, "val", fmt=data.format, decode=False)
    result = score(ds, data.model, ev.ten_crop, ev.batch_size, card["num_classes"])
    plots = Path(data.plots)
    files = [plots / "per_class_error.csv", plots / "confusion.png", plots / "curves.png"]
    write_per_class(
        files[0], result["per_class"], result["modes"], card["classes"], meta.get("names", card["classes"])
    )
    plot_confusion(files[1], result["confusion"], card["classes"])
    plot_curves(files[2], plots / "train_history.csv")
    metrics = result["metrics"]
    registry = log_to_mlflow(
        card["mlflow_run_id"], model, card, metrics, files, params["mlflow"].registered_model
    )
    out = {**metrics, "model_version": registry["version"], "champion": registry["champion"]}
    atomic_write_text(Path(data.eval_metrics), json.dumps(out, indent=1))
    return out
