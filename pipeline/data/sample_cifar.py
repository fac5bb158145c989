"""The sample in CIFAR-10's own format, for the paper's Figure 1 where CIFAR-10 is absent.

`sample.layout: cifar10` writes what the CIFAR-10 download unpacks to, and what
:func:`pipeline.data.cifar.ingest_cifar10` reads::

    <out_dir>/cifar-10-batches-py/batches.meta     {b"label_names": [bytes], b"num_cases_per_batch",
                                                    b"num_vis"}
    <out_dir>/cifar-10-batches-py/data_batch_1..5  {b"batch_label", b"labels": [int],
    <out_dir>/cifar-10-batches-py/test_batch        b"data": (N, 3072) uint8, b"filenames": [bytes]}

pickled (protocol 4: bytes as bytes, arrays through numpy's ``_reconstruct``, the globals
the reader admits) with bytes keys and names, as the official Python-2 pickles load with
``encoding="bytes"``; ``data`` rows are channel-major (1024 red, 1024 green, 1024 blue
values, each row-major). Classes in a random order within every batch, the train images
dealt evenly over the five batches, as in CIFAR-10.

Content: class ``j`` is design ``j`` of :mod:`pipeline.data.sample_shapes`, the same
objects over clutter as the ImageNet-shaped sample, drawn on a CANVAS-pixel square and
downscaled (antialiased) to 32 px, so the classes are learnable but not trivial, as in
CIFAR-10 small objects lose their texture at this size. Every image draws from its own
seeded stream: the same params give byte-identical files.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.data.cifar import CIFAR_DIR, CIFAR_SIDE, CIFAR_TEST_BATCH, CIFAR_TRAIN_BATCHES
from pipeline.data.sample_render import render
from pipeline.data.sample_shapes import DESIGNS

if TYPE_CHECKING:
    from pipeline.config import SampleParams

CANVAS = 96  # px: drawn at 3x, then downscaled to CIFAR_SIDE
_CIFAR_STREAM = 10  # SeedSequence word: independent of the ImageNet-shaped sample's streams
_TRAIN, _VAL, _ORDER = range(3)


def label_names(num_classes: int) -> list[str]:
    """The class names: each design as ``shape-fill-modifier`` (e.g. ``disc-outline-plain``)."""
    return ["-".join(DESIGNS[rank]) for rank in range(num_classes)]


def _image(seed: int, split: int, rank: int, index: int) -> np.ndarray:
    """One 32 x 32 picture of class `rank` as a channel-major row of 3072 uint8."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CIFAR_STREAM, split, rank, index]))
    picture, _ = render(rng, DESIGNS[rank], (CANVAS, CANVAS))
    small = picture.resize((CIFAR_SIDE, CIFAR_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1).reshape(-1)  # (32, 32, 3) -> (3072,)


def _batch(seed: int, split: int, label: str, items: list[tuple[int, int]]) -> dict[bytes, object]:
    data = np.empty((len(items), 3 * CIFAR_SIDE * CIFAR_SIDE), dtype=np.uint8)
    for row, (rank, index) in enumerate(items):
        data[row] = _image(seed, split, rank, index)
    return {
        b"batch_label": label.encode(),
        b"labels": [rank for rank, _ in items],
        b"data": data,
        b"filenames": [f"class{rank}_s{split}_{index:05d}.png".encode() for rank, index in items],
    }


def _dump(obj: object, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=4))


def write_cifar_sample(out_dir: Path, params: SampleParams) -> list[str]:
    """Writes `out_dir/cifar-10-batches-py/` (see the module docstring); `out_dir` exists.

    Args:
        out_dir: The (temporary) folder to fill.
        params: The ``sample`` section: ``num_classes``, ``train_per_class``,
            ``val_per_class``, ``seed``.

    Returns:
        The names of the files written, under CIFAR_DIR.
    """
    n, seed = params.num_classes, params.seed
    root = out_dir / CIFAR_DIR
    root.mkdir()
    order = np.random.default_rng(np.random.SeedSequence([seed, _CIFAR_STREAM, _ORDER]))
    train = [(r, i) for r in range(n) for i in range(params.train_per_class)]
    train = [train[k] for k in order.permutation(len(train))]
    val = [(r, i) for r in range(n) for i in range(params.val_per_class)]
    val = [val[k] for k in order.permutation(len(val))]
    per_batch = np.array_split(np.arange(len(train)), len(CIFAR_TRAIN_BATCHES))
    for number, (name, rows) in enumerate(zip(CIFAR_TRAIN_BATCHES, per_batch, strict=True), start=1):
        items = [train[k] for k in rows]
        _dump(_batch(seed, _TRAIN, f"training batch {number} of 5", items), root / name)
    _dump(_batch(seed, _VAL, "testing batch 1 of 1", val), root / CIFAR_TEST_BATCH)
    meta = {
        b"label_names": [name.encode() for name in label_names(n)],
        b"num_cases_per_batch": len(per_batch[0]),
        b"num_vis": 3 * CIFAR_SIDE * CIFAR_SIDE,
    }
    _dump(meta, root / "batches.meta")
    return sorted(f"{CIFAR_DIR}/{p.name}" for p in root.iterdir())
