"""Benchmark of the training input path against the peers' loaders on the same stored images.

Shards the corpus of benchmarks/preprocess.py (built once, cached in --workdir) at 256 px
with `write_shards` (every image in one train split, both formats), copies the same JPEG
bytes into each peer's format (benchmarks/peer_readers.py `prepare`), then measures the
images/s each loader delivers to a training loop as shuffled (B, 3, crop, crop) float32
batches with the same work per image, our `TrainAugment` (decode, random crop, flip,
PCA lighting, normalise), on the same --cpus cores:

- ours: a Ray Train worker's input path (pipeline.train.batches, as pipeline.train.loop
  runs it): its shard files of the epoch, read by Ray Data one task per file, each
  epoch's reading started once the previous epoch's rows are all in (`train_rows`) ->
  `epoch_batches` -> `augmented_batches` (TrainAugment on --cpus threads), over our
  Parquet shards (data.format's default) and, for reference, our WebDataset shards;
- litdata: `StreamingDataset` + `StreamingDataLoader` (litdata 0.2.76) over its chunks;
- mds: MosaicML `StreamingDataset` (mosaicml-streaming 0.13.0) + `DataLoader` over MDS;
- webdataset: the `webdataset` library's `WebDataset` + `WebLoader` over OUR tars;
- imagefolder: torchvision `ImageFolder` + `DataLoader` over one file per image.

Every peer loader runs --cpus worker processes, each applying TrainAugment to whole
batches (its collate_fn), in the peers' venv (benchmarks/peers_env.py).

Clock rules, the same for all: start-up is counted for none. Each path runs one untimed
pass first (it starts the loader's worker processes, which persist; our Ray is up before
it), then --epochs timed passes, back to back, each clocked from the end of the one
before (ours reads ahead into the next epoch, as training does: the last timed pass
pays for reading into an epoch nobody asks for). Other users share the cores, so the
paths run in --rounds rounds in rotated order; each path's best pass counts, and every
pass also reports the CPU seconds all the path's processes spent per image
(benchmarks/rounds.py).
The last line is `read_vs_best_peer: X` (ours over Parquet, images/s, over the fastest
peer's).

Usage: .venv/bin/python benchmarks/peers_read.py [--images 5000] [--crop 224] [--batch 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.input_pipeline import STATS, consume  # noqa: E402
from benchmarks.peers_env import cpu_seconds, peers_python, run_peer  # noqa: E402
from benchmarks.preprocess import build_corpus  # noqa: E402
from benchmarks.rounds import Run, load, report, run_rounds  # noqa: E402
from pipeline.cluster import start_local_ray  # noqa: E402
from pipeline.config import ShardParams  # noqa: E402
from pipeline.data.imagenet import ingest_imagenet  # noqa: E402
from pipeline.data.shard_writer import write_shards  # noqa: E402
from pipeline.data.shards import ShardMeta  # noqa: E402
from pipeline.train.batches import augmented_batches, epoch_batches, train_rows  # noqa: E402
from pipeline.transforms import TrainAugment  # noqa: E402

SIZE = 256
SHARD_SIZE = 250  # 20 shards for 5,000 images, as benchmarks/input_pipeline.py
PCA_STD = 0.1
SEED = 0
PEERS = {
    "litdata": "litdata StreamingDataset + StreamingDataLoader",
    "mds": "mds StreamingDataset + DataLoader",
    "webdataset": "webdataset WebDataset + WebLoader (our tars)",
    "imagefolder": "torchvision ImageFolder + DataLoader",
}
OURS = "ours (Parquet shards)"


def _tars(data: Path) -> list[str]:
    """Our WebDataset shards of the benchmark data."""
    return ShardMeta.read(str(data / "shards")).files("train", "webdataset")


def ensure_data(corpus: Path, out: Path, workers: int) -> None:
    """Our shards (both formats, one train split) in out/shards and the peers' copies in
    out/peers, built once per corpus."""
    manifest = out / "bench.json"
    wanted = {"corpus": str(corpus), "size": SIZE, "shard_size": SHARD_SIZE, "version": 2}
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return
    catalog = ingest_imagenet(str(corpus))
    records = [dataclasses.replace(r, split="train") for r in catalog.records]
    settings = ShardParams(size=SIZE, format="both", shard_size=SHARD_SIZE)
    write_shards(records, out / "shards", classes=catalog.classes, settings=settings, progress=False)
    tars = _tars(out)
    copied = run_peer("peer_readers", "prepare", tars=tars, out=str(out / "peers"), workers=workers)
    if copied["samples"] != len(records):
        raise RuntimeError(f"peers' copies hold {copied['samples']} of {len(records)} images")
    manifest.write_text(json.dumps(wanted))


def ours(shards: Path, fmt: str, args: argparse.Namespace) -> list[Run]:
    """--epochs timed passes of our training input path (one worker), after an untimed one."""
    meta = ShardMeta.read(str(shards))  # digests checked as in training
    rows = train_rows(meta, fmt, args.batch, seed=SEED, rank=0, world=1, epochs=1 + args.epochs)
    augment = TrainAugment(STATS, args.crop, PCA_STD, threads=args.cpus)
    runs = []
    for epoch in range(1 + args.epochs):
        cpu, start = cpu_seconds(), time.perf_counter()
        batches = epoch_batches(rows.epoch(epoch), args.batch, SEED, epoch)
        n = consume(augmented_batches(batches, augment, SEED, epoch, 0))
        if epoch:
            runs.append(Run(n, time.perf_counter() - start, cpu_seconds() - cpu))
    augment.close()
    return runs


def peer(loader: str, data: Path, args: argparse.Namespace) -> list[Run]:
    """--epochs timed passes of one peer loader (peers' venv)."""
    passes = run_peer(
        "peer_readers", "read", loader=loader, data=str(data / "peers"),
        tars=_tars(data), batch=args.batch,
        workers=args.cpus, epochs=args.epochs, crop=args.crop, pca_std=PCA_STD,
        stats=dataclasses.asdict(STATS), seed=SEED,
    )  # fmt: skip
    return [Run(int(n), seconds, cpu) for n, seconds, cpu in passes]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="corpus size (all read as train)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/alexnet-preprocess-bench"))
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs, threads, loader workers")
    ap.add_argument("--epochs", type=int, default=2, help="timed passes per path and round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    peers_python()  # build the peers' venv before any clock
    print(f"load avg before: {load()}", flush=True)
    start_local_ray(args.cpus, quiet=True)
    corpus = build_corpus(args.workdir / "corpus", args.images, SEED)
    data = args.workdir / "peers-read"
    ensure_data(corpus, data, args.cpus)
    paths: dict[str, Callable[[], list[Run]]] = {
        OURS: lambda: ours(data / "shards", "parquet", args),
        "ours (WebDataset shards)": lambda: ours(data / "shards", "webdataset", args),
        **{label: (lambda loader=loader: peer(loader, data, args)) for loader, label in PEERS.items()},
    }
    runs = run_rounds(paths, args.rounds)
    ray.shutdown()
    fastest, ratio = report(runs, OURS, list(PEERS.values()))
    print(f"fastest peer: {fastest}; batch {args.batch}, crop {args.crop}, {args.cpus} cores, "
          "start-up not counted")  # fmt: skip
    print(f"read_vs_best_peer: {ratio:.2f}")


if __name__ == "__main__":
    main()
