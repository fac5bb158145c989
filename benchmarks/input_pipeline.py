"""Benchmark of the training input path against torchvision's ImageFolder and a no-framework floor.

Builds (once, cached in --workdir) the ILSVRC-shaped corpus of benchmarks/preprocess.py
(JPEGs cut from scikit-image's photos at ImageNet's size mix), shards all of it at 256 px
with `write_shards` (cached too), then measures images/s delivered to a training loop as
batched, augmented float tensors (decode, random crop, flip, PCA lighting, normalise) on
the same images and the same cores:

- real: what a training worker runs: `train_rows` (the worker's shard files through Ray
  Data, in order, each epoch's reading started as the previous one's rows run out) ->
  `epoch_batches` -> `augmented_batches` (TrainAugment threads, two batches in flight);
- imagefolder: torchvision `ImageFolder` over the raw JPEGs + `DataLoader(num_workers)`
  with RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize;
- floor: the same TrainAugment over the shards read with pyarrow, batches in order,
  no framework, no shuffle.

Also prints where the real path spends its time: Ray Data's iterator alone (numpy batches
of JPEG bytes, no decoding) with and without the shuffle buffer of `epoch_batches`.
Each rate is the best of --epochs passes over the corpus (the first pass of the Ray
paths includes starting Ray Data's tasks, as a training epoch does).
The last line is `input_speedup_vs_imagefolder: X` (real images/s / ImageFolder images/s).

Usage: .venv/bin/python benchmarks/input_pipeline.py [--images 5000] [--crop 224] [--batch 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.preprocess import build_corpus  # noqa: E402
from pipeline.cluster import start_local_ray  # noqa: E402
from pipeline.config import ShardParams  # noqa: E402
from pipeline.data.imagenet import ingest_imagenet  # noqa: E402
from pipeline.data.shard_writer import write_shards  # noqa: E402
from pipeline.data.shards import ShardMeta  # noqa: E402
from pipeline.data.stats import ColorStats  # noqa: E402
from pipeline.train.batches import augmented_batches, batch_rng, epoch_batches, shard_rows, train_rows  # noqa: E402
from pipeline.transforms import TrainAugment  # noqa: E402

# The usual ImageNet statistics (fb.resnet.torch's mean, std and RGB eigenpairs): the
# benchmark measures speed, so the training set's own stats are not needed.
STATS = ColorStats(
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    eigval=(0.2175, 0.0188, 0.0045),
    eigvec=((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203)),
)
SIZE = 256
SHARD_SIZE = 250  # 20 shards for 5,000 images: several read tasks per core
SEED = 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def best_rate(label: str, passes: int, run: Callable[[], int]) -> float:
    """Runs `run` (one pass, returns images delivered) `passes` times; prints and returns the best rate."""
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - start))
    shown = ", ".join(f"{r:.0f}" for r in rates)
    print(f"{label}: {max(rates):.1f} images/s (passes: {shown}; load avg: {_load()})", flush=True)
    return max(rates)


def consume(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Drains (x, y) batches as a training loop would; returns the number of images."""
    n = 0
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.long  # noqa: S101 - a wrong path is no benchmark
        n += len(y)
    return n


def ensure_shards(corpus: Path, out: Path) -> None:
    """Shards every corpus image (train and val alike) into out/ at SIZE px, once."""
    manifest = out / "bench.json"
    wanted = {"corpus": str(corpus), "size": SIZE, "shard_size": SHARD_SIZE, "version": 1}
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return
    catalog = ingest_imagenet(str(corpus))
    # One train split of all images: the benchmark wants the most images per pass.
    records = [dataclasses.replace(r, split="train") for r in catalog.records]
    settings = ShardParams(size=SIZE, format="parquet", shard_size=SHARD_SIZE)
    write_shards(records, out, classes=catalog.classes, settings=settings, progress=False)
    manifest.write_text(json.dumps(wanted))


def imagefolder_pass(corpus: Path, crop: int, batch: int, workers: int) -> int:
    """One epoch of the torchvision baseline over the raw JPEGs; returns images delivered."""
    from torch.utils.data import ConcatDataset, DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(crop),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(STATS.mean, STATS.std),
        ]
    )
    ds = ConcatDataset([datasets.ImageFolder(str(corpus / s), transform=tf) for s in ("train", "val")])
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    return consume(loader)


def floor_pass(files: list[str], augment: TrainAugment, batch: int) -> int:
    """The same augmentation over batches read with pyarrow, no framework; returns images."""
    import numpy as np

    n = 0
    step = 0
    rest_jpeg: list[bytes] = []
    rest_label: list[int] = []
    for f in files:
        table = pq.read_table(f, columns=["label", "jpeg"])
        rest_jpeg += table.column("jpeg").to_pylist()
        rest_label += table.column("label").to_pylist()
        while len(rest_jpeg) >= batch:
            x = augment(rest_jpeg[:batch], batch_rng(SEED, 0, 0, step))
            y = torch.as_tensor(np.asarray(rest_label[:batch]), dtype=torch.long)
            del rest_jpeg[:batch], rest_label[:batch]
            n += consume([(x, y)])
            step += 1
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="corpus size (train + val, all used)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/alexnet-preprocess-bench"))
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs, loader workers, threads")
    ap.add_argument("--epochs", type=int, default=2, help="passes per path (best is reported)")
    args = ap.parse_args(argv)

    print(f"load avg before: {_load()}", flush=True)
    torch.set_num_threads(args.cpus)
    start_local_ray(num_cpus=args.cpus, quiet=True)
    corpus = build_corpus(args.workdir / "corpus", args.images, SEED)
    shards = args.workdir / f"shards-{SIZE}"
    ensure_shards(corpus, shards)
    digests = ShardMeta.read(str(shards)).digests("train", "parquet")  # checked as in training
    files = list(digests)
    augment = TrainAugment(STATS, args.crop, 0.1, threads=args.cpus)

    epoch = iter(range(1_000_000))  # a fresh epoch (a fresh shuffle) per pass, as in training

    rows = train_rows(
        ShardMeta.read(str(shards)), "parquet", args.batch, seed=SEED, rank=0, world=1, epochs=args.epochs
    )

    def real() -> int:
        e = next(epoch)
        batches = epoch_batches(rows.epoch(e), args.batch, SEED, e)
        return consume(augmented_batches(batches, augment, SEED, e, 0))

    def iterator_only(shuffled: bool) -> Callable[[], int]:
        def run() -> int:
            rows = shard_rows(files, "parquet", args.batch, digests)
            batches = epoch_batches(rows, args.batch, SEED, next(epoch)) if shuffled else rows
            return sum(len(b["label"]) for b in batches)

        return run

    rates = {
        "real": best_rate("real (Ray Data -> epoch_batches -> augmented_batches)", args.epochs, real),
        "floor": best_rate(
            f"floor (pyarrow + TrainAugment, {args.cpus} threads)",
            args.epochs,
            lambda: floor_pass(files, augment, args.batch),
        ),
    }
    best_rate("  Ray Data iterator alone, numpy JPEG batches", args.epochs, iterator_only(False))
    best_rate("  Ray Data iterator + epoch_batches shuffle", args.epochs, iterator_only(True))
    augment.close()
    ray.shutdown()
    rates["imagefolder"] = best_rate(
        f"imagefolder (ImageFolder + DataLoader, {args.cpus} workers)",
        1,  # its workers start afresh every epoch: one pass is its steady state
        lambda: imagefolder_pass(corpus, args.crop, args.batch, args.cpus),
    )
    print(f"real / floor: {rates['real'] / rates['floor']:.0%}")
    print(f"input_speedup_vs_imagefolder: {rates['real'] / rates['imagefolder']:.2f}")


if __name__ == "__main__":
    main()
