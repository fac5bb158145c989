"""The train stage's driver: resume-or-start a tracked Ray Train run and export its model.

It checks everything that can fail before any worker starts (inputs, tracking server,
cluster resources, a forward pass of the network at the crop size), names the run after a
hash of what it depends on (pipeline.train.runstate), starts `TorchTrainer` with the
workers of pipeline.train.loop, and writes the model card, the history and the metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.cluster import init_ray
from pipeline.config import Params, TrainParams
from pipeline.data.shards import QUARANTINE, CorruptShardError, ShardMeta, check_shard_files
from pipeline.data.stats import ColorStats
from pipeline.storage import absolute, atomic_write_text, join
from pipeline.train.batches import READ_CPUS
from pipeline.train.checkpoints import load_state
from pipeline.train.divergence import TrainingDiverged, check_history
from pipeline.train.loop import WorkerConfig, train_loop_per_worker
from pipeline.train.model_card import ModelCard, build_network, save_model
from pipeline.train.runstate import RunState, run_key

POLL_INTERVAL_S = 0.2  # Ray Train's controller polls the workers this often (see fit)


def _open_mlflow_run(state: RunState, params: Params) -> str:
    """Continues the run's MLflow run after an interruption, else starts a new one."""
    import mlflow

    saved = state.read()
    if saved and not saved.get("complete"):
        return saved["mlflow_run_id"]
    state.reset()
    data = params.data
    experiment_id = tracking.use_experiment(params.mlflow.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=state.name) as run:
        mlflow.log_params(params.flat())
        mlflow.set_tags(tracking.run_tags())
        digest = tracking.dvc_out_hashes("shard").get(data.shards, "")
        tracking.log_dataset(data.shards, digest, "shards-train", "training")
        tracking.log_dataset(data.shards, digest, "shards-val", "validation")
        for path in ("params.yaml", data.stats, data.shard_metrics, join(data.shards, QUARANTINE)):
            if Path(path).is_file():
                mlflow.log_artifact(path, artifact_path="inputs")
        if Path(data.shard_metrics).is_file():  # the Ray nodes that wrote the shards
            per_node = json.loads(Path(data.shard_metrics).read_text()).get("shards_per_node", {})
            mlflow.set_tag("shard_nodes", ",".join(sorted(per_node)))
    state.write({"mlflow_run_id": run.info.run_id, "complete": False})
    return run.info.run_id


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Per-epoch metrics as CSV (DVC plots read it)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def check_runnable(cfg: WorkerConfig) -> None:
    """Runs the network once on a (1, 3, crop, crop) input, so a shape error surfaces here
    rather than in every retried worker.

    Raises:
        ValueError: Naming train.crop and the model params.
    """
    model = build_network(cfg.model, cfg.num_classes).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, cfg.train.crop, cfg.train.crop))
    except RuntimeError as e:
        raise ValueError(f"train.crop={cfg.train.crop} does not fit model {cfg.model}: {e}") from e


def check_resources(p: TrainParams) -> None:
    """Fails fast when the cluster cannot host the workers and still feed them.

    Each worker must fit on one node, all of them on the nodes at once (as whole
    `train.cpus_per_worker` slices of each node's CPUs), and they must leave READ_CPUS of
    the cluster to the Ray Data tasks that read their shard files. Fractional
    `train.cpus_per_worker` lets several workers share a core.

    Raises:
        ValueError: Naming train.num_workers, train.cpus_per_worker and what the cluster has.
    """
    import ray

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    request = f"train.num_workers={p.num_workers} x train.cpus_per_worker={p.cpus_per_worker:g}"
    have = f"the Ray cluster's nodes have {', '.join(f'{c:g}' for c in nodes) or 'no'} CPUs"
    # Workers per node: the float division's rounding must not lose a slice (0.3 x 10 = 3).
    fits = sum(math.floor(c / p.cpus_per_worker + 1e-9) for c in nodes)
    if fits < p.num_workers:
        raise ValueError(
            f"{request}: {have}, room for {fits} such workers; lower train.cpus_per_worker "
            "(fractions work: a worker uses all its node's cores anyway) or train.num_workers"
        )
    if sum(nodes) - p.num_workers * p.cpus_per_worker < READ_CPUS - 1e-9:
        raise ValueError(
            f"{request} reserve {p.num_workers * p.cpus_per_worker:g} of the Ray cluster's {sum(nodes):g} "
            f"CPUs; the shard reads that feed them need {READ_CPUS:g} more: lower train.cpus_per_worker "
            "(fractions work) or train.num_workers"
        )


def check_shards(meta: ShardMeta, fmt: str, p: TrainParams) -> None:
    """Fails fast when a shard file is missing or has another length than meta.json lists
    (the readers check each file's SHA-256 as they read it), or when a worker would get
    no train shard (shards are split per file).

    Raises:
        CorruptShardError: Naming the bad files.
        ValueError: Naming the number of train shards, train.num_workers and shard.shard_size.
    """
    if problems := check_shard_files(meta, fmt, full=False):
        listed = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise CorruptShardError(
            f"{len(problems)} shard files of {meta.root} are not as the shard stage wrote them:\n  {listed}\n"
            "rerun the shard stage (`dvc repro -f shard`)"
        )
    files = meta.files("train", fmt)
    if len(files) < p.num_workers:
        raise ValueError(
            f"{meta.root} has {len(files)} train shard files for train.num_workers={p.num_workers}: "
            f"every worker reads whole shard files; lower shard.shard_size (now {meta.shard_size})"
        )


def fit(cfg: WorkerConfig, storage_path: str, name: str):
    """Runs (or resumes) training on Ray and returns the Ray Train Result.

    The workers read their own shard files (pipeline.train.batches.worker_files), so no
    dataset goes through Ray Train's split.

    Args:
        cfg: What every worker gets.
        storage_path: RunConfig.storage_path: an absolute folder or a shared URI.
        name: Run name; rerunning with the same (storage_path, name) resumes.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    p = cfg.train
    # Ray Train's controller takes each worker's report when it polls them (every 2 s by
    # default) and a worker's next report waits for that: on the sample, where an epoch takes
    # well under a second, the wait was most of every epoch. Ray propagates the setting from
    # this driver to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(POLL_INTERVAL_S))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": cfg},
        scaling_config=ray.train.ScalingConfig(
            num_workers=p.num_workers,
            use_gpu=p.use_gpu,
            resources_per_worker={"CPU": p.cpus_per_worker, **({"GPU": 1} if p.use_gpu else {})},
            placement_strategy=p.placement.upper(),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's per-report INFO lines (each epoch's whole TrainingReport, checkpoint
            # paths, worker-group start) would bury the workers' one line per epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


def _export(result, cfg: WorkerConfig, meta: ShardMeta, state: RunState, params: Params) -> dict:
    """Writes the model and its card, the history CSV and the metrics JSON of a finished fit."""
    import mlflow

    with result.checkpoint.as_directory() as d:
        final = load_state(d)
    history = final["history"]
    tracking.EpochLogger(cfg.mlflow).require(history)  # epochs a tracking outage left unlogged
    run_id = cfg.mlflow.run_id
    _refuse_diverged(history, cfg, state)
    mlflow.set_tag("worker_nodes", ",".join(final["placements"][-1]))  # the last attempt's, by rank
    mlflow.log_dict({"worker_nodes": final["placements"]}, "worker_nodes.json")  # every attempt's
    card = ModelCard(
        arch=cfg.model,
        num_classes=cfg.num_classes,
        classes=meta.classes,
        crop=cfg.train.crop,
        stats=cfg.stats,
        epochs=final["epoch"],
        mlflow_run_id=run_id,
        ray_run=state.name,
    )
    save_model(final["model"], params.data.model, card)
    write_history(history, Path(params.data.plots) / "train_history.csv")
    summary = {
        **history[-1],
        "best_val_top1_error": min(h["val_top1_error"] for h in history),
        "epochs_run": final["epoch"],
        "mlflow_run_id": run_id,
        "worker_nodes": final["placements"],  # per attempt, the Ray node of every worker by rank
    }
    atomic_write_text(Path(params.data.train_metrics), json.dumps(summary, indent=1))
    mlflow.log_metric("best_val_top1_error", summary["best_val_top1_error"])
    return summary


def _refuse_diverged(history: list[dict[str, float]], cfg: WorkerConfig, state: RunState) -> None:
    """Tags a diverged run in MLflow and stops before its model is exported (so it is never
    evaluated, registered or made `candidate`); a rerun of the stage starts afresh.

    Raises:
        TrainingDiverged: Naming the epoch, the loss and the params to change.
    """
    import mlflow

    verdict = check_history(history, cfg.num_classes, cfg.divergence)
    if not verdict:
        return
    mlflow.set_tags(
        {"diverged": "true", "diverged_reason": verdict.reason, "diverged_epoch": str(verdict.epoch)}
    )
    state.write({"mlflow_run_id": cfg.mlflow.run_id, "complete": True, "diverged": verdict.reason})
    raise TrainingDiverged(
        f"training diverged, stopped after epoch {verdict.epoch} of {cfg.train.epochs}: {verdict.reason}. "
        f"The model is not exported or registered (MLflow run {cfg.mlflow.run_id} is tagged diverged=true). "
        f"Try a lower train.lr (now {cfg.train.lr:g}) or a longer train.warmup_epochs "
        f"(now {cfg.train.warmup_epochs})."
    )


def train(params: Params) -> dict:
    """Runs the train stage: resumes the interrupted run of the same config, else starts one.

    Args:
        params: The validated params (pipeline.config.load_params).

    Returns:
        The final epoch's metrics plus run identifiers.
    """
    import mlflow

    data, p = params.data, params.train
    meta = ShardMeta.read(data.shards)
    stats = ColorStats.read(data.stats)
    uri = tracking.connect()  # before any expensive work
    cfg = WorkerConfig(params.model, p, stats, meta, data.format, divergence=params.divergence)
    check_runnable(cfg)
    check_shards(meta, data.format, p)
    model_params, train_params = dataclasses.asdict(params.model), dataclasses.asdict(p)
    key = run_key(model_params, train_params, meta.to_json(), stats.to_json())
    state = RunState(data.checkpoints, f"{p.run_name}-{key}")
    init_ray(state_api=True)  # Ray Train's placement-group cleaner polls it
    check_resources(p)
    run_id = _open_mlflow_run(state, params)
    cfg = dataclasses.replace(cfg, mlflow=tracking.RunRef(uri, run_id))
    with mlflow.start_run(run_id=run_id, log_system_metrics=params.mlflow.system_metrics):
        result = fit(cfg, absolute(data.checkpoints), state.name)
        if result.error:
            raise RuntimeError(f"training failed: {result.error}") from result.error
        summary = _export(result, cfg, meta, state, params)
    state.write({"mlflow_run_id": run_id, "complete": True})
    return summary
