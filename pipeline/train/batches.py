"""A training worker's input: its shard files, as shuffled, augmented batches.

`worker_files` gives each worker its shard files for an epoch: an exact partition, so
every image is seen once per epoch whatever the number of workers (no row dropped or
repeated to even the split); `step_totals` says how many images each synchronous step
holds over all workers, so that unequal shares still give the global batch's mean.
`epoch_batches` turns the worker's rows into shuffled batches of JPEG bytes, the last
one partial; `augmented_batches` decodes and augments them (pipeline.transforms) two
batches ahead of the model. Every random choice is a pure function of (seed, epoch,
rank, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from pipeline.data.shards import ShardMeta, read_shard_files
from pipeline.transforms import Augmenter

# CPUs each shard-file read task requests: reading and hashing a file is light beside the
# workers' decoding, and a node whose workers hold all but half a CPU must still feed them.
READ_CPUS = 0.5

Chunks = Iterator[dict[str, np.ndarray]]  # rows in numpy chunks: {"key", "label", "jpeg"}


def worker_files(files: list[str], seed: int, epoch: int, rank: int, world: int) -> list[str]:
    """This worker's shard files for one epoch: every world-th of a seeded permutation.

    The permutation changes every epoch, so each worker sees other shards each epoch;
    the workers' lists are disjoint and together hold every file once.
    """
    order = np.random.default_rng([seed, epoch, world]).permutation(len(files))
    return [files[i] for i in order[rank::world]]


def step_totals(rows_per_rank: list[int], local_batch: int) -> list[int]:
    """Images in each step of an epoch, summed over the workers.

    Every worker takes the same number of steps (DDP's all-reduces pair up step by
    step): as many as the largest share needs. A worker whose share has run out steps
    on nothing, with weight 0 (`train_epoch`).
    """
    steps = max(-(-rows // local_batch) for rows in rows_per_rank)
    return [
        sum(min(local_batch, max(0, rows - k * local_batch)) for rows in rows_per_rank) for k in range(steps)
    ]


def torch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a worker's torch RNG (dropout) for one epoch: resuming needs no saved state."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def batch_rng(seed: int, epoch: int, rank: int, step: int) -> np.random.Generator:
    """The generator of one batch's augmentation: a pure function of where it is in the run."""
    return np.random.default_rng([seed, epoch, rank, step])


def run_ahead(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
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


def shard_rows(
    files: list[str], fmt: str, batch_size: int, digests: Mapping[str, str], prefetch: int = 4
) -> Iterator[dict[str, np.ndarray]]:
    """The rows of shard `files`, in stored order, as numpy chunks ({"key", "label", "jpeg"}).

    Read through Ray Data (one task per file, READ_CPUS each) with preserve_order, since
    the batches `epoch_batches` draws depend on the order; `prefetch` chunks are fetched
    ahead. Each
    file's SHA-256 is checked against `digests` (`ShardMeta.digests`) before its rows exist.
    """
    if not files:
        return iter(())
    ds = read_shard_files(files, fmt, digests=digests, num_cpus=READ_CPUS)
    ds.context.execution_options.preserve_order = True
    return ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch)


def train_rows(
    shards: ShardMeta, fmt: str, batch_size: int, *, seed: int, rank: int, world: int, epochs: int
) -> EpochRows:
    """A training worker's rows for every epoch: its `worker_files` share of the train
    files, read by `shard_rows` in chunks of `batch_size` and checked against their
    digests, each epoch's reading started a shuffle pool's worth of chunks ahead
    (`EpochRows`)."""
    digests = shards.digests("train", fmt)

    def read(epoch: int) -> Chunks:
        return shard_rows(worker_files(list(digests), seed, epoch, rank, world), fmt, batch_size, digests)

    return EpochRows(read, epochs, ahead=-(-pool_rows(batch_size) // batch_size))


def pool_rows(batch_size: int) -> int:
    """Rows `epoch_batches` holds before it draws a batch: its shuffle buffer and one batch."""
    return max(4 * batch_size, 1024) + batch_size


class EpochRows:
    """A worker's rows epoch after epoch, each epoch's reading started before it is due.

    `epoch(e)` yields epoch e's chunks (`read(e)`, e.g. `shard_rows` of the worker's
    files); once they have all arrived, epoch e + 1's reading starts in the background
    and runs `ahead` chunks ahead: Ray Data plans it and its first shards arrive while
    epoch e's last rows are still shuffled, trained on and validated, so no epoch but the
    first begins by waiting for its shards. Ask for epochs in order; the rows are the
    same as without reading ahead.
    """

    def __init__(self, read: Callable[[int], Chunks], epochs: int, ahead: int) -> None:
        """`read(e)`: epoch e's chunks; `epochs`: how many there are (none read past them)."""
        self._read, self._epochs, self._ahead = read, epochs, ahead
        self._next: tuple[int, Chunks] | None = None

    def epoch(self, epoch: int) -> Chunks:
        """Epoch `epoch`'s chunks, in `read`'s order."""
        started, self._next = self._next, None
        yield from started[1] if started and started[0] == epoch else self._started(epoch)
        if epoch + 1 < self._epochs:
            self._next = (epoch + 1, self._started(epoch + 1))

    def _started(self, epoch: int) -> Chunks:
        return run_ahead(self._read(epoch), self._ahead)


def epoch_batches(
    chunks: Iterable[dict[str, np.ndarray]], batch_size: int, seed: int, epoch: int
) -> Iterator[dict[str, np.ndarray]]:
    """This worker's train batches for one epoch ({"key", "label", "jpeg"} numpy arrays).

    A seeded shuffle buffer over rows in Python, rather than Ray Data's
    local_shuffle_buffer_size, which concatenates and slices the Arrow binary column for
    every batch. Rows enter the buffer one at a time in stored order and a batch is drawn
    whenever it holds `buffer + batch_size` rows, so the batches depend only on the row
    order (fixed with preserve_order), the seed and the epoch, not on Ray Data's block
    sizes. Every row comes out once: the last batch holds what is left.

    Args:
        chunks: The worker's rows in stored order, in numpy chunks of any size
            (`shard_rows`).
        batch_size: Images per batch on this worker.
        seed: train.seed.
        epoch: 0-based epoch; with the seed it fixes the order, fresh every epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    full = pool_rows(batch_size)
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

    for chunk in chunks:
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
    order = rng.permutation(len(pool))  # the tail, the last batch partial
    for start in range(0, len(order), batch_size):
        yield batch([pool[i] for i in order[start : start + batch_size]])


def augmented_batches(
    batches: Iterator[dict[str, np.ndarray]], augment: Augmenter, seed: int, epoch: int, rank: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x (B, 3, crop, crop) float32, y (B,) int64) pairs, prepared ahead of the consumer.

    A background thread feeds the augmentation threads: it submits batch i + 1 before
    waiting for batch i, so they never idle at a batch boundary, and holds finished
    batches for the consumer (`run_ahead`)."""

    def prepared() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pending: collections.deque = collections.deque()  # (PendingBatch, labels), oldest first
        for step, batch in enumerate(batches):
            x = augment.submit(list(batch["jpeg"]), batch_rng(seed, epoch, rank, step))
            pending.append((x, torch.as_tensor(batch["label"], dtype=torch.long)))
            if len(pending) == 2:  # the next batch is queued before this one is awaited
                x, y = pending.popleft()
                yield x.result(), y
        for x, y in pending:
            yield x.result(), y

    return run_ahead(prepared())
