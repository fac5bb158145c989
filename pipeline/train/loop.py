"""Data-parallel SGD-momentum AlexNet training on Ray Train (Train V2 APIs).

The driver (`fit`) builds a `TorchTrainer`; every worker runs `train_loop_per_worker`:
Ray Data streams JPEG bytes of its share of the train shards (`get_dataset_shard`),
a thread pool decodes and augments them (pipeline.transforms) two batches ahead of the model,
and DDP (gloo on CPUs, NCCL on GPUs) averages gradients. Each epoch ends with validation,
exact top-1/top-5 counts summed over all workers, and a checkpoint reported through
`ray.train.report`, so a rerun with the same storage folder resumes where it stopped and a
killed worker is replaced from the last checkpoint (FailureConfig.max_failures).

Optimiser: PyTorch SGD with momentum and weight decay, v <- m v + (g + wd w), w <- w - lr v.
With a constant lr this is the paper's update (v <- 0.9 v - 0.0005 e w - e g) with v scaled
by 1/lr. The batch is global (train.batch_size, split evenly over workers); when changing
it, scale lr linearly: lr = 0.01 * batch_size / 128 (Goyal et al. 2017).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ModelParams, TrainParams
from pipeline.train.model_card import build_from_params
from pipeline.transforms import ColorStats, GpuTrainAugment, TrainAugment, eval_batch

STATE_FILE = "state.pt"


class _Resumable:
    """A schedule whose whole state is its attributes (saved in every checkpoint)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume."""
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()` output."""
        vars(self).update(state)


class PlateauSchedule(_Resumable):
    """The paper's schedule: divide lr by 10 when val error stops improving.

    After `patience` epochs without a new best val top-1 error the lr drops tenfold; after
    `max_reductions` drops, a further plateau ends training (the paper reduced three
    times before stopping).
    """

    def __init__(self, lr: float, patience: int, max_reductions: int) -> None:
        self.lr = lr
        self.patience = patience
        self.max_reductions = max_reductions
        self.best = float("inf")
        self.bad_epochs = 0
        self.reductions = 0
        self.stop = False

    def step(self, val_error: float) -> None:
        """Updates the schedule with one epoch's val top-1 error."""
        if val_error < self.best:
            self.best, self.bad_epochs = val_error, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            if self.reductions >= self.max_reductions:
                self.stop = True
            else:
                self.lr /= 10.0
                self.reductions += 1
                self.bad_epochs = 0


class StepSchedule(_Resumable):
    """torchvision's reference recipe: lr /10 every `step_size` epochs."""

    def __init__(self, lr: float, step_size: int) -> None:
        self.base_lr = lr
        self.lr = lr
        self.step_size = step_size
        self.epochs = 0
        self.stop = False

    def step(self, val_error: float) -> None:  # noqa: ARG002 - same interface as plateau
        """Counts one epoch."""
        self.epochs += 1
        self.lr = self.base_lr * 0.1 ** (self.epochs // self.step_size)


def make_schedule(p: TrainParams) -> PlateauSchedule | StepSchedule:
    """The lr schedule chosen by train.schedule."""
    if p.schedule == "plateau":
        return PlateauSchedule(p.lr, p.patience, p.max_reductions)
    return StepSchedule(p.lr, p.step_size)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Counts of top-1 and top-5 hits: logits (B, C), labels (B,)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    hits = top == labels.view(-1, 1)
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def batch_rng(seed: int, epoch: int, rank: int, step: int) -> np.random.Generator:
    """The generator of one batch's augmentation: a pure function of where it is in the run."""
    return np.random.default_rng([seed, epoch, rank, step])


def _prefetch(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Runs `batches` in a background thread, `depth` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in batches:
                q.put(item)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=produce, daemon=True, name="prefetch").start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums counts over all workers (exact totals, not averages of per-worker means)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _autocast(p: TrainParams, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.precision == "bf16")


def epoch_batches(
    shard, batch_size: int, seed: int, epoch: int, prefetch: int = 4
) -> Iterator[dict[str, np.ndarray]]:
    """This worker's train batches for one epoch ({"key", "label", "jpeg"} numpy arrays).

    A seeded shuffle buffer over rows in Python: Ray Data's local_shuffle_buffer_size
    concatenates and slices the Arrow binary column for every batch; replacing it raised
    the images/s delivered on 2 cores from 46% to 63-68% of the no-framework floor
    (benchmarks/input_pipeline.py). Rows enter the buffer one at a time in stored order
    and a batch is drawn whenever it holds `buffer + batch_size` rows, so the batches
    depend only on the row order (fixed by the trainer's preserve_order), the seed and the
    epoch, not on Ray Data's block sizes.

    Args:
        shard: A Ray Data iterator (`ray.train.get_dataset_shard("train")`).
        batch_size: Images per batch on this worker.
        seed: train.seed.
        epoch: 0-based epoch; with the seed it fixes the order, fresh every epoch.
        prefetch: Batches of JPEG bytes Ray Data fetches ahead of the shuffle buffer.
    """
    rng = np.random.default_rng([seed, epoch])
    full = max(4 * batch_size, 1024) + batch_size
    pool: list[tuple[Any, int, bytes]] = []  # (key, label, jpeg) rows

    def batch(rows: list[tuple[Any, int, bytes]]) -> dict[str, np.ndarray]:
        keys, labels, jpegs = zip(*rows, strict=True)
        as_objects = np.empty(len(rows), dtype=object)  # bytes stay whole Python objects
        as_objects[:] = jpegs
        return {
            "key": np.array(keys, dtype=object),
            "label": np.array(labels, dtype=np.int64),
            "jpeg": as_objects,
        }

    for chunk in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch):
        rows = list(zip(chunk["key"], chunk["label"].tolist(), chunk["jpeg"], strict=True))
        while rows:
            take = full - len(pool)
            pool += rows[:take]
            rows = rows[take:]
            if len(pool) == full:
                picks = rng.choice(full, batch_size, replace=False)
                out = [pool[i] for i in picks]
                for i in sorted(picks, reverse=True):  # O(batch) removal: the last row fills the gap
                    pool[i] = pool[-1]
                    pool.pop()
                yield batch(out)
    order = rng.permutation(len(pool))  # the tail: whole batches only (drop_last)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield batch([pool[i] for i in order[start : start + batch_size]])


def augmented_batches(
    batches: Iterator[dict[str, np.ndarray]], augment, seed: int, epoch: int, rank: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x (B, 3, crop, crop) float32, y (B,) int64) pairs, prepared ahead of the consumer.

    A background thread feeds the augmentation threads: it submits batch i + 1 before
    waiting for batch i, so they never idle at a batch boundary, and holds finished
    batches for the consumer (`_prefetch`)."""

    def prepared() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pending: collections.deque = collections.deque()  # (AugmentedBatch, labels), oldest first
        for step, batch in enumerate(batches):
            x = augment.submit(list(batch["jpeg"]), batch_rng(seed, epoch, rank, step))
            pending.append((x, torch.as_tensor(batch["label"], dtype=torch.long)))
            if len(pending) == 2:  # the next batch is queued before this one is awaited
                x, y = pending.popleft()
                yield x.result(), y
        for x, y in pending:
            yield x.result(), y

    return _prefetch(prepared())


def _train_epoch(model, opt, batches, p: TrainParams, device) -> list[float]:
    """One pass over this worker's shard. Returns [loss_sum, top1, top5, n]."""
    model.train()
    sums = [0.0, 0.0, 0.0, 0.0]
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
        t1, t5 = topk_correct(logits.detach(), y)
        sums = [sums[0] + float(loss) * len(y), sums[1] + t1, sums[2] + t5, sums[3] + len(y)]
    return sums


@torch.no_grad()
def _validate(model, loader, stats: ColorStats, p: TrainParams, device, augment) -> list[float]:
    """Centre-crop validation over this worker's val shard. Returns [loss_sum, top1, top5, n]."""
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]

    def prepared() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            images = augment.decode(batch["jpeg"])
            yield eval_batch(images, stats, p.crop, ten_crop=False), torch.as_tensor(batch["label"])

    for x, y in _prefetch(prepared()):
        x, y = x.to(device), y.to(device)
        with _autocast(p, device):
            logits = model(x).float()
        t1, t5 = topk_correct(logits, y)
        loss = F.cross_entropy(logits, y, reduction="sum")
        sums = [sums[0] + float(loss), sums[1] + t1, sums[2] + t5, sums[3] + len(y)]
    return sums


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _save_state(path: Path, model, opt, sched, epoch: int, history: list, restarts: int, cfg: dict) -> None:
    torch.save(
        {
            "model": _unwrap(model).state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": sched.state_dict(),
            "epoch": epoch,
            "history": history,
            "restarts": restarts,
            "torch_rng": torch.get_rng_state(),
            "params": {"model": cfg["model"], "train": cfg["train"]},
        },
        path / STATE_FILE,
    )


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Reads a training checkpoint (tensors and plain data only: weights_only=True)."""
    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train worker function.

    Args:
        cfg: {"model": ModelParams fields, "train": TrainParams fields, "stats": ColorStats
            fields, "num_classes": int, "mlflow": {"tracking_uri", "run_id"} or None}.
    """
    import ray.train
    import ray.train.torch

    from pipeline import tracking

    p = TrainParams(**cfg["train"])
    stats = ColorStats(**cfg["stats"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Every core of this node's share, not just the CPUs reserved from Ray: the reservation
    # must leave CPUs for the Ray Data tasks that feed the workers.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()

    torch.manual_seed(p.seed)  # identical initial weights on every worker
    model = build_from_params(cfg["model"], cfg["num_classes"])
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    sched = make_schedule(p)
    start_epoch, history, restarts = 0, [], 0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history, restarts = state["epoch"], state["history"], state["restarts"] + 1

    model = ray.train.torch.prepare_model(model)
    if p.compile:
        model = torch.compile(model)
    if p.gpu_augment and device.type == "cuda":
        augment = GpuTrainAugment(stats, p.crop, p.pca_std, device)
    else:
        augment = TrainAugment(stats, p.crop, p.pca_std, threads=p.augment_threads)
    local_batch = p.batch_size // world
    logger = tracking.EpochLogger(cfg["mlflow"]) if rank == 0 and cfg["mlflow"] else None
    if logger:
        logger.backfill(history)

    for epoch in range(start_epoch, p.epochs):
        if sched.stop:
            break
        for group in opt.param_groups:
            group["lr"] = sched.lr
        t0 = time.perf_counter()
        batches = epoch_batches(ray.train.get_dataset_shard("train"), local_batch, p.seed, epoch)
        batches = augmented_batches(batches, augment, p.seed, epoch, rank)
        tr = _all_reduce_sum(_train_epoch(model, opt, batches, p, device), device)
        train_time = time.perf_counter() - t0
        val_loader = ray.train.get_dataset_shard("val").iter_batches(
            batch_size=local_batch, batch_format="numpy"
        )
        va = _all_reduce_sum(_validate(model, val_loader, stats, p, device, augment), device)
        metrics = {
            "epoch": epoch + 1,
            "lr": sched.lr,
            "train_loss": tr[0] / max(tr[3], 1),
            "train_top1_error": 1 - tr[1] / max(tr[3], 1),
            "train_top5_error": 1 - tr[2] / max(tr[3], 1),
            "val_loss": va[0] / max(va[3], 1),
            "val_top1_error": 1 - va[1] / max(va[3], 1),
            "val_top5_error": 1 - va[2] / max(va[3], 1),
            "images_per_s": tr[3] / train_time,
            "epoch_time_s": time.perf_counter() - t0,
            "restarts": restarts,
        }
        sched.step(metrics["val_top1_error"])
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                _save_state(Path(tmp), model, opt, sched, epoch + 1, history, restarts, cfg)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                checkpoint_dir_name=f"epoch-{epoch + 1:04d}",
            )
        if logger:  # after the checkpoint: a crash before it reruns (and logs) the epoch once
            logger.log_epoch(metrics)
    augment.close()


def worker_config(
    mp: ModelParams, p: TrainParams, stats: ColorStats, num_classes: int, mlflow_info: dict[str, str] | None
) -> dict[str, Any]:
    """The plain-data config that travels to every worker."""
    return {
        "model": dataclasses.asdict(mp),
        "train": dataclasses.asdict(p),
        "stats": dataclasses.asdict(stats),
        "num_classes": num_classes,
        "mlflow": mlflow_info,
    }


def check_resources(p: TrainParams) -> None:
    """Fails fast when the workers would reserve every CPU and starve their data feed.

    Raises:
        ValueError: Naming train.num_workers and train.cpus_per_worker.
    """
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    if total - p.num_workers * p.cpus_per_worker < 1:
        raise ValueError(
            f"train.num_workers={p.num_workers} x train.cpus_per_worker={p.cpus_per_worker} reserve every "
            f"CPU of the Ray cluster ({total:.0f}); Ray Data needs at least one to feed them: lower "
            "train.cpus_per_worker (a worker uses all its node's cores anyway)"
        )


def fit(train_ds, val_ds, cfg: dict[str, Any], storage_path: str, name: str):
    """Runs (or resumes) training on Ray and returns the Ray Train Result.

    Args:
        train_ds: Ray Dataset with columns key, label, jpeg (train shards).
        val_ds: Same for the val shards.
        cfg: `worker_config(...)` output.
        storage_path: RunConfig.storage_path: a local folder or a shared URI.
        name: Run name; rerunning with the same (storage_path, name) resumes.
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    p = TrainParams(**cfg["train"])
    if p.batch_size % p.num_workers:
        raise ValueError(
            f"train.batch_size={p.batch_size} must be divisible by train.num_workers={p.num_workers}"
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=p.num_workers,
            use_gpu=p.use_gpu,
            resources_per_worker={"CPU": p.cpus_per_worker, **({"GPU": 1} if p.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_ds, "val": val_ds},
        # preserve_order: with fixed seeds, a resumed run sees exactly the batches an
        # uninterrupted one would.
        dataset_config=ray.train.DataConfig(
            datasets_to_split="all", execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    return trainer.fit()
