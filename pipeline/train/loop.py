"""What every Ray Train worker runs: data-parallel SGD-momentum epochs with checkpoints.

Each worker gets its share of the train shards from Ray Data (`get_dataset_shard`),
turns them into augmented batches (pipeline.train.batches), and DDP (gloo on CPUs, NCCL
on GPUs) averages the gradients. Each epoch ends with validation, exact top-1/top-5
counts summed over all workers, and a checkpoint reported through `ray.train.report`, so
a rerun with the same storage folder resumes where it stopped and a killed worker is
replaced from the last checkpoint (FailureConfig.max_failures).

Optimiser: PyTorch SGD with momentum and weight decay, v <- m v + (g + wd w), w <- w - lr v.
With a constant lr this is the paper's update (v <- 0.9 v - 0.0005 e w - e g) with v scaled
by 1/lr. The batch is global (train.batch_size, split evenly over workers); when changing
it, scale lr linearly: lr = 0.01 * batch_size / 128 (Goyal et al. 2017).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models import unwrap
from pipeline.config import ModelParams, TrainParams
from pipeline.data.stats import ColorStats
from pipeline.scoring import hits, top_classes
from pipeline.tracking import RunRef
from pipeline.train.batches import augmented_batches, epoch_batches, run_ahead
from pipeline.train.model_card import build_network
from pipeline.train.schedules import make_schedule
from pipeline.transforms import Augmenter, GpuTrainAugment, TrainAugment, eval_batch

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a training worker needs, sent to every worker as it is.

    Attributes:
        model: The network's switches.
        train: The recipe, scaling and execution switches.
        stats: Normalisation and PCA-lighting statistics of the train shards.
        num_classes: Output classes.
        mlflow: Where rank 0 logs per-epoch metrics (None: not tracked).
    """

    model: ModelParams
    train: TrainParams
    stats: ColorStats
    num_classes: int
    mlflow: RunRef | None = None


@dataclass
class _Sums:
    """Exact counts over the images a worker saw; summed over workers before use."""

    loss: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    images: float = 0.0

    def add(self, loss_sum: float, top: torch.Tensor, y: torch.Tensor) -> None:
        """Adds one batch: summed loss, (B, k) predicted classes, (B,) labels."""
        h1, h5 = hits(top, y)
        self.loss += loss_sum
        self.top1 += int(h1.sum())
        self.top5 += int(h5.sum())
        self.images += len(y)

    def all_reduced(self, device: torch.device) -> _Sums:
        """The sums over all workers (exact totals, not averages of per-worker means)."""
        t = torch.tensor(dataclasses.astuple(self), dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return _Sums(*t.tolist())

    def metrics(self, split: str) -> dict[str, float]:
        """Mean loss and top-1/top-5 error of `split`."""
        n = max(self.images, 1)
        return {
            f"{split}_loss": self.loss / n,
            f"{split}_top1_error": 1 - self.top1 / n,
            f"{split}_top5_error": 1 - self.top5 / n,
        }


def _autocast(p: TrainParams, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.precision == "bf16")


def _train_epoch(model, opt, batches: Iterable, p: TrainParams, device: torch.device) -> _Sums:
    """One pass over this worker's shard."""
    model.train()
    sums = _Sums()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if p.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(p, device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums.add(float(loss.detach()) * len(y), top_classes(logits.detach()), y)
    return sums


@torch.no_grad()
def _validate(model, loader: Iterable, cfg: WorkerConfig, device: torch.device, augment: Augmenter) -> _Sums:
    """Centre-crop validation over this worker's val shard."""
    model.eval()
    sums = _Sums()

    def prepared() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            images = augment.decode(batch["jpeg"])
            x = eval_batch(images, cfg.stats, cfg.train.crop, ten_crop=False)  # (B, 3, crop, crop)
            yield x, torch.as_tensor(batch["label"])

    for x, y in run_ahead(prepared()):
        x, y = x.to(device), y.to(device)
        with _autocast(cfg.train, device):
            logits = model(x).float()
        sums.add(float(F.cross_entropy(logits, y, reduction="sum")), top_classes(logits), y)
    return sums


def save_state(path: Path, model, opt, sched, history: list[dict], restarts: int, cfg: WorkerConfig) -> None:
    """Writes a training checkpoint's state file (tensors and plain data only)."""
    torch.save(
        {
            "model": unwrap(model).state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": sched.state_dict(),
            "epoch": len(history),
            "history": history,
            "restarts": restarts,
            "torch_rng": torch.get_rng_state(),
            "params": {"model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train)},
        },
        path / STATE_FILE,
    )


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Reads a training checkpoint (tensors and plain data only: weights_only=True)."""
    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)


@dataclass
class _Run:
    """One worker's training state: what a checkpoint saves and restores."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    history: list[dict[str, float]]
    restarts: int


def _start_or_resume(cfg: WorkerConfig) -> _Run:
    """Builds model, optimizer and schedule, restored from Ray Train's checkpoint if any."""
    import ray.train

    p = cfg.train
    torch.manual_seed(p.seed)  # identical initial weights on every worker
    model = build_network(cfg.model, cfg.num_classes)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sched = make_schedule(p)
    opt = torch.optim.SGD(model.parameters(), lr=sched.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    run = _Run(model, opt, sched, [], 0)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        run.history, run.restarts = state["history"], state["restarts"] + 1
    return run


def _make_augment(cfg: WorkerConfig, device: torch.device) -> Augmenter:
    p = cfg.train
    if p.gpu_augment and device.type == "cuda":
        return GpuTrainAugment(cfg.stats, p.crop, p.pca_std, device)
    return TrainAugment(cfg.stats, p.crop, p.pca_std, threads=p.augment_threads)


def _epoch(run: _Run, model, augment: Augmenter, cfg: WorkerConfig, device: torch.device) -> dict[str, float]:
    """Trains and validates one epoch; returns its metrics (summed over all workers)."""
    import ray.train

    ctx = ray.train.get_context()
    p, epoch = cfg.train, len(run.history)
    local_batch = p.batch_size // ctx.get_world_size()
    run.sched.apply(run.opt)
    t0 = time.perf_counter()
    batches = epoch_batches(ray.train.get_dataset_shard("train"), local_batch, p.seed, epoch)
    batches = augmented_batches(batches, augment, p.seed, epoch, ctx.get_world_rank())
    tr = _train_epoch(model, run.opt, batches, p, device).all_reduced(device)
    train_time = time.perf_counter() - t0
    val_loader = ray.train.get_dataset_shard("val").iter_batches(batch_size=local_batch, batch_format="numpy")
    va = _validate(model, val_loader, cfg, device, augment).all_reduced(device)
    return {
        "epoch": epoch + 1,
        "lr": run.sched.lr,
        **tr.metrics("train"),
        **va.metrics("val"),
        "images_per_s": tr.images / train_time,
        "epoch_time_s": time.perf_counter() - t0,
        "restarts": run.restarts,
    }


def _checkpoint(run: _Run, metrics: dict[str, float], cfg: WorkerConfig) -> None:
    """Reports the epoch to Ray Train, with rank 0's checkpoint of the whole state."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            save_state(Path(tmp), run.model, run.opt, run.sched, run.history, run.restarts, cfg)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
            checkpoint_dir_name=f"epoch-{int(metrics['epoch']):04d}",
        )


def train_loop_per_worker(config: dict[str, WorkerConfig]) -> None:
    """The Ray Train worker function.

    Args:
        config: {"worker": the WorkerConfig} (Ray Train passes its train_loop_config).
    """
    import ray.train
    import ray.train.torch

    from pipeline.tracking import EpochLogger

    cfg = config["worker"]
    ctx = ray.train.get_context()
    # Every core of this node's share, not just the CPUs reserved from Ray: the reservation
    # must leave CPUs for the Ray Data tasks that feed the workers.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    run = _start_or_resume(cfg)
    model = ray.train.torch.prepare_model(run.model)
    if cfg.train.compile:
        model = torch.compile(model)
    augment = _make_augment(cfg, device)
    logger = EpochLogger(cfg.mlflow) if ctx.get_world_rank() == 0 and cfg.mlflow else None
    if logger:
        logger.backfill(run.history)
    while len(run.history) < cfg.train.epochs and not run.sched.stop:
        metrics = _epoch(run, model, augment, cfg, device)
        run.sched.step(metrics["val_top1_error"])
        run.history.append(metrics)
        _checkpoint(run, metrics, cfg)
        if logger:  # after the checkpoint: a crash before it reruns (and logs) the epoch once
            logger.log_epoch(metrics)
    augment.close()
