"""Benchmark of the shard stage's writing against the peers a user would pick instead.

On the corpus of benchmarks/preprocess.py (JPEGs cut from scikit-image's photos at
ImageNet's size mix; built once, cached in --workdir), every writer applies our per-image
function (`preprocess_image` at the size and JPEG quality of the ImageNet profile,
params-imagenet.yaml) to every image and writes the same columns (key, label, wnid, jpeg,
height, width, src_height, src_width) once, on the same --workers cores:

- ours: `write_shards` on a local Ray, as the ImageNet profile's shard stage runs it (its
  `shard` params: one format, Parquet, and its images per shard); and, for reference,
  the sample profile's format, Parquet and WebDataset, i.e. every image written twice;
- litdata: Lightning's `optimize()` (litdata 0.2.76) with --workers forked workers;
- mds: MosaicML's `MDSWriter` (mosaicml-streaming 0.13.0) in --workers processes, one
  contiguous slice each, then `merge_index`.

The peers run in their own venv (benchmarks/peers_env.py: they need numpy < 2.2, below
our pin), in a fresh subprocess per run.

Clock rules, the same for all: start-up is counted for none. Each clock starts once the
writer's processes are up with torch imported (our Ray workers warmed by `warm_workers`,
as the stage does while it lists the input tree; MosaicML's pool after a no-op task;
litdata forks its workers inside `optimize()`, inheriting the imports, in milliseconds)
and stops when the whole output is on disk (ours: meta.json written and the folder
swapped in; litdata: `optimize()` returned; MosaicML: the merged index written). Each
writer's output of the previous round is deleted before its clock starts.

Other users share the cores, so the paths run in --rounds rounds, each in a rotated order,
and each path's best round counts (benchmarks/rounds.py); every run also reports the CPU
seconds all of the path's processes spent per image, which the other users' load moves
much less. The last line is `write_vs_best_peer: X` (our images/s, as the ImageNet
profile writes, over the fastest peer's); the line before it gives the same ratio for
both formats.

Usage: .venv/bin/python benchmarks/peers_write.py [--images 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.peers_env import cpu_seconds, peers_python, run_peer  # noqa: E402
from benchmarks.preprocess import build_corpus  # noqa: E402
from benchmarks.rounds import Run, best_rate, load, report, run_rounds  # noqa: E402
from pipeline.cluster import start_local_ray  # noqa: E402
from pipeline.config import ShardParams, load_params  # noqa: E402
from pipeline.data.imagenet import ingest_imagenet  # noqa: E402
from pipeline.data.records import Record  # noqa: E402
from pipeline.data.shard_writer import warm_workers, write_shards  # noqa: E402
from pipeline.data.shards import ShardMeta  # noqa: E402

PROFILE = Path(__file__).resolve().parents[1] / "params-imagenet.yaml"
OURS = "ours (ImageNet profile: Parquet)"
BOTH = "ours (Parquet + WebDataset)"
PEERS = {"litdata_write": "litdata optimize()", "mds_write": "mds MDSWriter + merge_index"}


def ours(records: list[Record], out: Path, classes: list[str], settings: ShardParams) -> list[Run]:
    """One run of the shard stage's writer (workers warmed, the last round's output deleted; untimed)."""
    ray.get(warm_workers())
    shutil.rmtree(out, ignore_errors=True)  # as the peers' runs do theirs
    cpu, start = cpu_seconds(), time.perf_counter()
    write_shards(records, out, classes=classes, settings=settings, progress=False)
    run = Run(len(records), time.perf_counter() - start, cpu_seconds() - cpu)
    written = sum(ShardMeta.read(str(out)).counts.values())
    if written != len(records):
        raise RuntimeError(f"ours wrote {written} of {len(records)} inputs")
    return [run]


def peer(function: str, records: list[Record], out: Path, workers: int, settings: ShardParams) -> list[Run]:
    """One run of a peer writer in the peers' venv."""
    items = [[r.key, r.label, r.wnid, r.path] for r in records]
    result = run_peer(
        "peer_writers", function, items=items, out=str(out), workers=workers, size=settings.size,
        quality=settings.quality,
    )  # fmt: skip
    if result["written"] != len(records):
        raise RuntimeError(f"{function} wrote {result['written']} of {len(records)} inputs")
    return [Run(len(records), result["seconds"], result["cpu"])]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="corpus size")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/alexnet-preprocess-bench"))
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="cores for every writer")
    ap.add_argument("--rounds", type=int, default=3, help="runs per path (best counts)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    profile = load_params(PROFILE).shard

    peers_python()  # build the peers' venv before any clock
    print(f"load avg before: {load()}", flush=True)
    catalog = ingest_imagenet(str(build_corpus(args.workdir / "corpus", args.images, args.seed)))
    records = catalog.records
    start_local_ray(args.workers, quiet=True)
    scratch = args.workdir / "peers-write"
    both = dataclasses.replace(profile, format="both")
    paths: dict[str, Callable[[], list[Run]]] = {
        OURS: lambda: ours(records, scratch / "ours", catalog.classes, profile),
        BOTH: lambda: ours(records, scratch / "ours", catalog.classes, both),
        **{
            label: (lambda f=f: peer(f, records, scratch / f, args.workers, profile))
            for f, label in PEERS.items()
        },
    }
    runs = run_rounds(paths, args.rounds)
    ray.shutdown()
    shutil.rmtree(scratch)
    fastest, ratio = report(runs, OURS, list(PEERS.values()))
    print(
        f"fastest peer: {fastest}; {len(records)} images at {profile.size} px, {profile.shard_size} per "
        f"shard of ours, {args.workers} workers, start-up not counted"
    )
    print(f"write_both_formats_vs_best_peer: {best_rate(runs[BOTH]) / best_rate(runs[fastest]):.2f}")
    print(f"write_vs_best_peer: {ratio:.2f}")


if __name__ == "__main__":
    main()
