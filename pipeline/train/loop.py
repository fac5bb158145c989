"""What every Ray Train worker runs: data-parallel SGD-momentum epochs with checkpoints.

Each worker reads its own shard files of the epoch (pipeline.train.batches.worker_files,
an exact partition) through Ray Data, turns them into augmented batches, and DDP (gloo on
CPUs, NCCL on GPUs) averages the gradients. Shares may differ by a shard: all workers
take the same number of steps, a worker whose share has run out steps on nothing with
weight 0, and each worker's loss is weighted by its part of the step's images, so every
step's gradient is the mean over the images of that step, however they are spread (and
no worker ever waits on a collective another skipped). Each epoch ends with validation,
exact top-1/top-5 counts summed over all workers, and a checkpoint reported through
`ray.train.report`, so a rerun with the same storage folder resumes where it stopped and
a killed worker is replaced from the last checkpoint (FailureConfig.max_failures).

Optimiser: PyTorch SGD with momentum and weight decay, v <- m v + (g + wd w), w <- w - lr v.
With a constant lr this is the paper's update (v <- 0.9 v - 0.0005 e w - e g) with v scaled
by 1/lr. The batch is global (train.batch_size, split evenly over workers); when changing
it, scale lr linearly: lr = 0.01 * batch_size / 128 (Goyal et al. 2017).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models import unwrap
from pipeline.cluster import node_cpus, quiet_ray_data
from pipeline.config import DivergenceParams, ModelParams, TrainParams
from pipeline.data.shards import ShardMeta
from pipeline.data.stats import ColorStats
from pipeline.scoring import hits, top_classes
from pipeline.tracking import RunRef
from pipeline.train.batches import (
    EpochRows,
    augmented_batches,
    epoch_batches,
    run_ahead,
    shard_rows,
    step_totals,
    torch_seed,
    train_rows,
    worker_files,
)
from pipeline.train.checkpoints import STATE_FILE, checkpoint_name, require_checkpoint_space, resume_state
from pipeline.train.divergence import check_history
from pipeline.train.model_card import build_network
from pipeline.train.progress import progress_line
from pipeline.train.schedules import make_schedule
from pipeline.transforms import Augmenter, GpuTrainAugment, TrainAugment, eval_batch

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a training worker needs, sent to every worker as it is.

    Attributes:
        model: The network's switches.
        train: The recipe, scaling and execution switches.
        stats: Normalisation and PCA-lighting statistics of the train shards.
        shards: The shards' manifest (where they are, which files).
        fmt: The shard format to read (data.format).
        mlflow: Where rank 0 logs per-epoch metrics (None: not tracked).
        divergence: When a run stops early as diverged.
    """

    model: ModelParams
    train: TrainParams
    stats: ColorStats
    shards: ShardMeta
    fmt: str
    mlflow: RunRef | None = None
    divergence: DivergenceParams = DivergenceParams()

    @property
    def num_classes(self) -> int:
        """Output classes: one per class of the shards."""
        return len(self.shards.classes)


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
        """Mean loss, top-1/top-5 error and the number of images of `split`."""
        n = max(self.images, 1)
        return {
            f"{split}_loss": self.loss / n,
            f"{split}_top1_error": 1 - self.top1 / n,
            f"{split}_top5_error": 1 - self.top5 / n,
            f"{split}_images": int(self.images),
        }


def _autocast(p: TrainParams, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.precision == "bf16")


def train_epoch(
    model,
    opt,
    batches: Iterable,
    totals: list[int],
    p: TrainParams,
    device: torch.device,
    before_step: Callable[[int], object] | None = None,
) -> _Sums:
    """One epoch of this worker: one SGD step per entry of `totals`.

    Args:
        model: The (DDP-wrapped) network.
        opt: Its optimizer.
        batches: This worker's (x (B, 3, crop, crop), y (B,)) batches; may run out before
            `totals` does.
        totals: Images of each step over all workers (`step_totals`).
        p: The train params.
        device: Where the model is.
        before_step: Called with each step's index before it (the schedule sets its lr).

    Returns:
        This worker's counts (`all_reduced` sums them over the workers).
    """
    model.train()
    sums, batches = _Sums(), iter(batches)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    for i, total in enumerate(totals):
        if before_step:
            before_step(i)
        x, y = next(batches, (None, None))
        if x is None:  # this share has run out: a step of weight 0 keeps the all-reduces paired
            x, y = torch.zeros(1, 3, p.crop, p.crop), torch.zeros(1, dtype=torch.long)
            weight = 0.0
        else:
            weight = len(y) * world / total  # DDP divides the sum by world: the step's mean
        _step(model, opt, x, y, weight, p, device, sums)
    return sums


def _step(model, opt, x: torch.Tensor, y: torch.Tensor, weight: float, p: TrainParams, device, sums) -> None:
    """One SGD step on a (B, 3, crop, crop) batch whose mean loss counts `weight` times."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if p.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(p, device):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    (loss * weight if weight != 1.0 else loss).backward()
    opt.step()
    if weight:
        sums.add(float(loss.detach()) * len(y), top_classes(logits.detach()), y)


@torch.no_grad()
def _validate(model, loader: Iterable, cfg: WorkerConfig, device: torch.device, augment: Augmenter) -> _Sums:
    """Centre-crop validation over this worker's val shard."""
    model.eval()
    sums = _Sums()

    def prepared() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            images = augment.decode(batch["jpeg"])
            x = eval_batch(images, cfg.stats, cfg.train.crop, ten_crop=False)  # (B, 3, crop, crop)
            yield x, torch.tensor(batch["label"])  # a copy: Ray Data's arrays are read-only

    for x, y in run_ahead(prepared()):
        x, y = x.to(device), y.to(device)
        with _autocast(cfg.train, device):
            logits = model(x).float()
        sums.add(float(F.cross_entropy(logits, y, reduction="sum")), top_classes(logits), y)
    return sums


def save_state(path: Path, run: _Run, cfg: WorkerConfig) -> None:
    """Writes a training checkpoint's state file (tensors and plain data only)."""
    torch.save(
        {
            "model": unwrap(run.model).state_dict(),
            "optimizer": run.opt.state_dict(),
            "schedule": run.sched.state_dict(),
            "epoch": len(run.history),
            "history": run.history,
            "restarts": run.restarts,
            "placements": run.placements,
            "params": {"model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train)},
        },
        path / STATE_FILE,
    )


@dataclass
class _Run:
    """One worker's training state: what a checkpoint saves and restores.

    `placements` holds, per attempt (restarts count them), the Ray node id of every
    worker by rank: where the run actually trained. `taken`: checkpoint folder names
    already in the run folder, which this attempt's checkpoints must not reuse.
    """

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    restarts: int = 0
    placements: list[list[str]] = dataclasses.field(default_factory=list)
    taken: frozenset[str] = frozenset()


def _start_or_resume(cfg: WorkerConfig) -> _Run:
    """Builds model, optimizer and schedule, restored from Ray Train's checkpoint if any
    (or, when that one is damaged, from the newest one that loads: `resume_state`)."""
    import ray.train

    p = cfg.train
    torch.manual_seed(p.seed)  # identical initial weights on every worker
    model = build_network(cfg.model, cfg.num_classes)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sched = make_schedule(p)
    opt = torch.optim.SGD(model.parameters(), lr=sched.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    run = _Run(model, opt, sched)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        resume = resume_state(checkpoint.path, checkpoint.filesystem)
        state, run.taken = resume.state, resume.taken
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        run.history, run.placements = state["history"], state["placements"]
        run.restarts = state["restarts"] + 1
    run.placements = [*run.placements, _worker_nodes()]
    return run


def _worker_nodes() -> list[str]:
    """The Ray node id of every worker, by rank (gathered from all workers)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [node]
    nodes: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def _make_augment(cfg: WorkerConfig, device: torch.device) -> Augmenter:
    p = cfg.train
    if p.gpu_augment and device.type == "cuda":
        return GpuTrainAugment(cfg.stats, p.crop, p.pca_std, device)
    return TrainAugment(cfg.stats, p.crop, p.pca_std, threads=p.augment_threads)


def _epoch(
    run: _Run, model, augment: Augmenter, rows: EpochRows, cfg: WorkerConfig, device: torch.device
) -> dict[str, float]:
    """Trains and validates one epoch; returns its metrics (summed over all workers)."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    p, epoch = cfg.train, len(run.history)
    local_batch = p.batch_size // world
    torch.manual_seed(torch_seed(p.seed, epoch, rank))  # dropout
    t0 = time.perf_counter()
    sizes = cfg.shards.file_sizes("train", cfg.fmt)
    shares = [worker_files(list(sizes), p.seed, epoch, r, world) for r in range(world)]
    totals = step_totals([sum(sizes[f] for f in share) for share in shares], local_batch)
    batches = epoch_batches(rows.epoch(epoch), local_batch, p.seed, epoch)
    batches = augmented_batches(batches, augment, p.seed, epoch, rank)
    steps = len(totals)
    warm = lambda i: run.sched.apply(run.opt, epoch + (i + 1) / steps)  # noqa: E731 - lr per step
    tr = train_epoch(model, run.opt, batches, totals, p, device, warm).all_reduced(device)
    train_time = time.perf_counter() - t0
    val_files = cfg.shards.files("val", cfg.fmt)[rank::world]
    val_rows = shard_rows(val_files, cfg.fmt, local_batch, cfg.shards.digests("val", cfg.fmt))
    # The bare network: DDP's forward may take part in collectives, and val shares differ.
    va = _validate(unwrap(model), val_rows, cfg, device, augment).all_reduced(device)
    return {
        "epoch": epoch + 1,
        "lr": run.sched.lr_at(epoch + 1),  # the epoch's last step's
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
    name = checkpoint_name(int(metrics["epoch"]), run.taken)
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            save_state(Path(tmp), run, cfg)
            require_checkpoint_space(Path(tmp), name)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
            checkpoint_dir_name=name,
        )


def prepare_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The worker's model on its device, wrapped in DDP when there are several workers.

    The gradients live in DDP's all-reduce buckets (`gradient_as_bucket_view`): no copy
    into and out of the buckets per step, the same values.
    """
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"gradient_as_bucket_view": True})


def train_loop_per_worker(config: dict[str, WorkerConfig]) -> None:
    """The Ray Train worker function.

    Args:
        config: {"worker": the WorkerConfig} (Ray Train passes its train_loop_config).
    """
    import ray.train
    import ray.train.torch
    from ray.train.v2._internal.execution import context as train_context

    from pipeline.tracking import EpochLogger

    cfg = config["worker"]
    ctx = ray.train.get_context()
    quiet_ray_data()  # each epoch's datasets; the stage prints one line per epoch
    # Ray Train's whole TrainingReport per epoch: Ray 2.60 logs it under the module's file
    # path, outside `ray.train`, so RunConfig's LoggingConfig (which quiets the controller)
    # does not reach it.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # Every CPU of this node's share, not just the CPUs reserved from Ray: the reservation
    # must leave CPUs for the Ray Data tasks that feed the workers.
    torch.set_num_threads(max(1, node_cpus() // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    run = _start_or_resume(cfg)
    model = prepare_ddp(run.model)
    if cfg.train.compile:
        model = torch.compile(model)
    augment = _make_augment(cfg, device)
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    p = cfg.train
    rows = train_rows(
        cfg.shards, cfg.fmt, p.batch_size // world, seed=p.seed, rank=rank, world=world, epochs=p.epochs
    )
    logger = EpochLogger(cfg.mlflow) if rank == 0 and cfg.mlflow else None
    if logger:
        logger.backfill(run.history)
    # A diverged run stops after the epoch that shows it (every worker sees the same
    # all-reduced history); the driver refuses to export it.
    while (
        len(run.history) < cfg.train.epochs
        and not run.sched.stop
        and not check_history(run.history, cfg.num_classes, cfg.divergence)
    ):
        metrics = _epoch(run, model, augment, rows, cfg, device)
        run.sched.step(metrics["val_top1_error"])
        run.history.append(metrics)
        _checkpoint(run, metrics, cfg)
        if logger:  # after the checkpoint: a crash before it reruns (and logs) the epoch once
            logger.log_epoch(metrics)
        if rank == 0:  # a log record: Ray Train's patched print would tee it twice
            _log.info(progress_line(run.history, cfg.train.epochs))
    augment.close()
