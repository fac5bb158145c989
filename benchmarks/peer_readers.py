"""The peers' training loaders, run in the peers' venv (benchmarks/peers_env.py) by peers_read.py.

Every loader delivers the same batches a training loop takes: (x (B, 3, crop, crop)
float32, y (B,) int64), shuffled, whole batches only, from the same stored JPEGs (our
WebDataset shards' bytes, copied into each peer's format by `prepare`), with the same
work per image: `AugmentCollate`, i.e. our `TrainAugment` (decode, random crop, flip,
PCA lighting, normalise) on a batch in each loader worker process.

`read` runs one loader for 1 + `epochs` passes over the data on `workers` worker
processes (persistent across passes) and returns [images, seconds, CPU seconds of all
its processes] of each timed pass; the first pass starts the worker processes and is not
timed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.peers_env import cpu_seconds
from pipeline.data.stats import ColorStats
from pipeline.transforms import TrainAugment

MDS_COLUMNS = {"key": "str", "label": "int", "jpeg": "bytes"}
SHUFFLE_BUFFER = 1000  # webdataset's sample shuffle buffer (its docs' usual size)


class AugmentCollate:
    """collate_fn: samples (jpeg bytes, label) -> (x, y) by our TrainAugment, one thread.

    The TrainAugment is built in the worker process on first use (it holds a thread pool,
    which does not cross process boundaries); every batch draws from its own generator.
    """

    def __init__(self, stats: dict[str, Any], crop: int, pca_std: float, seed: int) -> None:
        self.stats = ColorStats(**{k: _tuples(v) for k, v in stats.items()})
        self.crop, self.pca_std, self.seed = crop, pca_std, seed
        self._augment: TrainAugment | None = None
        self._steps = itertools.count()

    def __call__(self, samples: list[tuple[bytes, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._augment is None:
            self._augment = TrainAugment(self.stats, self.crop, self.pca_std, threads=1)
        rng = np.random.default_rng([self.seed, os.getpid(), next(self._steps)])
        x = self._augment([jpeg for jpeg, _ in samples], rng)
        return x, torch.tensor([int(label) for _, label in samples], dtype=torch.long)


class _FromRows:
    """collate_fn over dict rows ({"jpeg", "label", ...}), as litdata and MosaicML yield them
    (litdata's jpeg is a memoryview into its chunk: bytes() makes it what our decoder takes)."""

    def __init__(self, collate: AugmentCollate) -> None:
        self.collate = collate

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate([(bytes(r["jpeg"]), r["label"]) for r in rows])


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _tar_rows(tars: list[str]) -> Iterator[tuple[str, int, bytes]]:
    """(key, label, jpeg) of our WebDataset shards, in stored order."""
    for path in tars:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            for jpg, cls in zip(members[::2], members[1::2], strict=True):
                key = jpg.name.rsplit(".", 1)[0]
                yield key, int(tar.extractfile(cls).read()), tar.extractfile(jpg).read()


def _row(row: tuple[str, int, bytes]) -> dict[str, Any]:
    key, label, jpeg = row
    return {"key": key, "label": label, "jpeg": jpeg}


def prepare(tars: list[str], out: str, workers: int) -> dict[str, int]:
    """Copies our WebDataset shards' samples into each peer's format under out/<loader>/.

    Untimed setup: litdata chunks (`optimize`), MosaicML MDS shards (`MDSWriter`), and an
    ImageFolder tree (out/imagefolder/<label>/<key>.jpg). Returns samples per format.
    """
    from litdata import optimize
    from streaming import MDSWriter

    shutil.rmtree(out, ignore_errors=True)
    rows = list(_tar_rows(tars))
    optimize(fn=_row, inputs=rows, output_dir=f"{out}/litdata", num_workers=workers, chunk_bytes=1 << 26,
             start_method="fork", verbose=False)  # fmt: skip
    with MDSWriter(out=f"{out}/mds", columns=MDS_COLUMNS) as writer:
        for row in rows:
            writer.write(_row(row))
    for key, label, jpeg in rows:
        folder = Path(out, "imagefolder", f"{label:04d}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.jpg").write_bytes(jpeg)
    return {"samples": len(rows)}


def _litdata(data: str, tars: list[str], batch: int, workers: int, collate: AugmentCollate) -> Iterable:
    from litdata import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(f"{data}/litdata", shuffle=True, drop_last=True)
    return StreamingDataLoader(
        ds, batch_size=batch, num_workers=workers, drop_last=True, persistent_workers=True,
        collate_fn=_FromRows(collate),
    )  # fmt: skip


def _mds(data: str, tars: list[str], batch: int, workers: int, collate: AugmentCollate) -> Iterable:
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    ds = StreamingDataset(local=f"{data}/mds", shuffle=True, batch_size=batch)
    return DataLoader(
        ds, batch_size=batch, num_workers=workers, drop_last=True, persistent_workers=True,
        collate_fn=_FromRows(collate),
    )  # fmt: skip


def _webdataset(data: str, tars: list[str], batch: int, workers: int, collate: AugmentCollate) -> Iterable:
    import webdataset as wds

    ds = (
        wds.WebDataset(tars, shardshuffle=len(tars), empty_check=False)
        .shuffle(SHUFFLE_BUFFER)
        .to_tuple("jpg", "cls")
        .batched(batch, collation_fn=collate, partial=False)
    )
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, persistent_workers=True)


def _imagefolder(data: str, tars: list[str], batch: int, workers: int, collate: AugmentCollate) -> Iterable:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(f"{data}/imagefolder", loader=_file_bytes)
    return DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True,
        collate_fn=collate,
    )  # fmt: skip


def _file_bytes(path: str) -> bytes:
    """ImageFolder's loader: the file's bytes (TrainAugment decodes them)."""
    with open(path, "rb") as f:
        return f.read()


_BUILDERS: dict[str, Callable[..., Iterable]] = {
    "litdata": _litdata,
    "mds": _mds,
    "webdataset": _webdataset,
    "imagefolder": _imagefolder,
}


def read(
    loader: str, data: str, tars: list[str], batch: int, workers: int, epochs: int, crop: int,
    pca_std: float, stats: dict[str, Any], seed: int,
) -> list[list[float]]:  # fmt: skip
    """[images, seconds, CPU seconds] of `epochs` timed passes of one peer loader, after one
    untimed pass.

    Args:
        loader: "litdata", "mds", "webdataset" or "imagefolder".
        data: `prepare`'s output folder.
        tars: Our WebDataset shards (what the webdataset loader reads).
        batch: Images per batch.
        workers: Loader worker processes.
        epochs: Timed passes.
        crop, pca_std, stats, seed: TrainAugment's settings.
    """
    collate = AugmentCollate(stats, crop, pca_std, seed)
    batches = _BUILDERS[loader](data, tars, batch, workers, collate)
    passes = []
    for epoch in range(1 + epochs):
        cpu, start = cpu_seconds(), time.perf_counter()
        n = 0
        for x, y in batches:
            if x.shape != (batch, 3, crop, crop) or x.dtype != torch.float32 or y.shape != (batch,):
                raise RuntimeError(f"{loader} delivered x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)}")
            n += len(y)
        if epoch:
            passes.append([n, time.perf_counter() - start, cpu_seconds() - cpu])
    return passes
