"""The train stage's work: resume-or-start a tracked Ray Train run and export its model."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.cluster import init_ray
from pipeline.config import DataParams, MlflowParams, ModelParams, TrainParams, as_flat_dict
from pipeline.data.imagenet import read_bytes
from pipeline.data.shards import META, read_shards
from pipeline.storage import atomic_write_text
from pipeline.train.loop import check_resources, fit, load_state, worker_config
from pipeline.train.model_card import save_model
from pipeline.train.runstate import RunState, run_key, storage_uri
from pipeline.transforms import ColorStats


def _read_meta(data: DataParams) -> tuple[dict[str, Any], bytes]:
    """The shards' meta.json (local path or URI), parsed and as bytes (for the run key)."""
    uri = f"{data.shards.rstrip('/')}/{META}"
    try:
        raw = read_bytes(uri)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: shard metadata missing; run the shard stage first") from e
    return json.loads(raw), raw


def _open_mlflow_run(state: RunState, params: dict[str, Any], data: DataParams, mlp: MlflowParams) -> str:
    """Continues the run's MLflow run after an interruption, else starts a new one."""
    import mlflow

    saved = state.read()
    if saved and not saved.get("complete"):
        return saved["mlflow_run_id"]
    state.reset()
    mlflow.set_experiment(mlp.experiment)
    with mlflow.start_run(run_name=state.name) as run:
        mlflow.log_params(as_flat_dict(params))
        mlflow.set_tags(tracking.run_tags())
        digests = tracking.dvc_out_hashes("shard")
        for split in ("train", "val"):
            tracking.log_dataset(
                data.shards,
                digests.get(data.shards, ""),
                f"shards-{split}",
                "training" if split == "train" else "validation",
            )
        for path in (
            "params.yaml",
            data.stats,
            data.shard_metrics,
            str(Path(data.shards) / "quarantine.csv"),
        ):
            if Path(path).is_file():
                mlflow.log_artifact(path, artifact_path="inputs")
    state.write({"mlflow_run_id": run.info.run_id, "complete": False})
    return run.info.run_id


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Per-epoch metrics as CSV (DVC plots read it)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def train(params: dict[str, Any]) -> dict[str, Any]:
    """Runs the train stage.

    Args:
        params: Every validated params section (pipeline.config.load_params).

    Returns:
        The final epoch's metrics plus run identifiers.
    """
    import mlflow

    data: DataParams = params["data"]
    mp: ModelParams = params["model"]
    p: TrainParams = params["train"]
    meta, meta_raw = _read_meta(data)
    stats = ColorStats.load(data.stats)
    uri = tracking.tracking_uri()
    tracking.check_tracking_server(uri)  # before any expensive work
    mlflow.set_tracking_uri(uri)

    key = run_key(dataclasses.asdict(mp), dataclasses.asdict(p), meta_raw, Path(data.stats).read_bytes())
    state = RunState(data.checkpoints, f"{p.run_name}-{key}")
    init_ray()
    check_resources(p)
    run_id = _open_mlflow_run(state, params, data, params["mlflow"])
    datasets = {s: read_shards(data.shards, s, fmt=data.format, decode=False) for s in ("train", "val")}
    cfg = worker_config(mp, p, stats, len(meta["classes"]), {"tracking_uri": uri, "run_id": run_id})
    with mlflow.start_run(run_id=run_id, log_system_metrics=params["mlflow"].system_metrics):
        result = fit(datasets["train"], datasets["val"], cfg, storage_uri(data.checkpoints), state.name)
        if result.error:
            raise RuntimeError(f"training failed: {result.error}") from result.error
        with result.checkpoint.as_directory() as d:
            final = load_state(d)
        history = final["history"]
        card = {
            "arch": dataclasses.asdict(mp),
            "num_classes": len(meta["classes"]),
            "classes": meta["classes"],
            "crop": p.crop,
            "stats": dataclasses.asdict(stats),
            "epochs": final["epoch"],
            "mlflow_run_id": run_id,
            "ray_run": state.name,
        }
        save_model(final["model"], data.model, card)
        write_history(history, Path(data.plots) / "train_history.csv")
        summary = {
            **history[-1],
            "best_val_top1_error": min(h["val_top1_error"] for h in history),
            "epochs_run": final["epoch"],
            "mlflow_run_id": run_id,
        }
        atomic_write_text(Path(data.train_metrics), json.dumps(summary, indent=1))
        mlflow.log_metric("best_val_top1_error", summary["best_val_top1_error"])
    state.write({"mlflow_run_id": run_id, "complete": True})
    return summary
