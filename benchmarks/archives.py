"""Benchmark of ingesting and sharding ImageNet from its archives against the extracted tree.

Generates (once, cached in --workdir) the sample as a tree, and packs the same images
as the official archives and as Kaggle's zip (`pipeline.data.sample_archives`), then
measures on all three, in turns, best of --rounds:

- ingestion: listing the tree vs indexing the archives (tar headers, seeking past the
  data; the zip's central directory), and reading the devkit/LOC label files;
- sharding: `write_shards` on Ray with all cores (both formats), reading each image
  from its own file vs by byte range from the archive (workers warm; ingestion not
  included).

Then indexes a header-only train tar of --index-members tiny members in --index-classes
class tars, to give the indexing rate at ImageNet's member count (1,281,167 train +
50,000 val members) without 150 GB of images. Page cache warm throughout: the archives
were just written or read.

The last line is `archives_vs_tree_shard_ratio: X` (archive images/s over tree images/s).

Usage: .venv/bin/python benchmarks/archives.py [--classes 10] [--train-per-class 300]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from pipeline.cluster import start_local_ray
from pipeline.config import SampleParams, ShardParams
from pipeline.data.archive_io import LOCAL_FETCH, open_archive, stat_archive
from pipeline.data.archives import INDEX_THREADS
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.records import Catalog
from pipeline.data.sample import generate_sample
from pipeline.data.sample_archives import pack_sample
from pipeline.data.shard_writer import warm_workers, write_shards
from pipeline.data.tar_index import index_tar

IMAGENET_MEMBERS = 1_281_167 + 50_000


def build(workdir: Path, params: SampleParams) -> dict[str, Path]:
    """{layout: data.raw} of the same images as a tree, the official archives and the zip."""
    roots = {"tree": workdir / "tree", "archives": workdir / "archives", "kaggle_zip": workdir / "kaggle_zip"}
    stamp = workdir / f"built-{params.num_classes}-{params.train_per_class}-{params.val_per_class}"
    if not stamp.exists():
        shutil.rmtree(workdir, ignore_errors=True)
        generate_sample(roots["tree"], params)
        for layout in ("archives", "kaggle_zip"):
            pack_sample(roots["tree"], roots[layout], layout, params.seed)
        stamp.touch()
    return roots


def best(fn: Callable[[], object], rounds: int) -> tuple[float, object]:
    """(fastest seconds of `rounds` calls, the last result)."""
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def header_only_tar(path: Path, classes: int, members: int) -> None:
    """A train tar of `classes` class tars holding `members` 1-byte members in all."""
    per_class = members // classes
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as outer:
        for c in range(classes):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for i in range(per_class):
                    info = tarfile.TarInfo(f"n{c:08d}_{i}.JPEG")
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"x"))
            info = tarfile.TarInfo(f"n{c:08d}.tar")
            info.size = len(inner.getvalue())
            outer.addfile(info, io.BytesIO(inner.getvalue()))


def index_rate(path: Path, threads: int) -> tuple[int, float]:
    """(members, seconds) of indexing a train tar as ingestion does: the outer headers,
    then the class tars, `threads` at once."""
    archive = stat_archive(str(path))
    start = time.perf_counter()
    handle = open_archive(archive)
    outer = index_tar(handle, 0, archive.size, LOCAL_FETCH)
    with ThreadPoolExecutor(threads) as pool:
        listings = pool.map(lambda m: index_tar(handle, m.offset, m.size, LOCAL_FETCH), outer.members)
        count = sum(len(listing.members) for listing in listings)
    return count, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--index-members", type=int, default=100_000)
    ap.add_argument("--index-classes", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/alexnet-archives-bench"))
    args = ap.parse_args(argv)
    print(f"load avg before: {os.getloadavg()[0]:.1f}", flush=True)
    params = SampleParams(args.classes, args.train_per_class, args.val_per_class)
    roots = build(args.workdir, params)
    for layout, root in roots.items():
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"{layout}: {size / 1e6:.1f} MB in {sum(1 for p in root.rglob('*') if p.is_file())} files")

    catalogs: dict[str, Catalog] = {}
    for layout, root in roots.items():
        seconds, catalogs[layout] = best(lambda root=root: ingest_imagenet(str(root)), 3)
        n = len(catalogs[layout].records)
        print(f"ingest {layout}: {seconds * 1e3:.1f} ms for {n} images ({seconds / n * 1e6:.1f} us/image)")

    start_local_ray(num_cpus=args.workers, quiet=True)
    ray.get(warm_workers())
    settings = ShardParams(size=128, format="both", shard_size=250, max_bad_fraction=0.01)
    out = args.workdir / "shards"
    rates: dict[str, float] = {}
    for _ in range(args.rounds):  # in turns, so load from other processes hits all alike
        for layout, catalog in catalogs.items():
            kw = {"classes": catalog.classes, "settings": settings, "quarantined": catalog.quarantine}
            seconds, _ = best(lambda c=catalog, kw=kw: write_shards(c.records, out, progress=False, **kw), 1)
            rates[layout] = max(rates.get(layout, 0.0), len(catalog.records) / seconds)
    for layout, rate in rates.items():
        print(f"shard {layout}: {rate:.0f} images/s ({args.workers} workers, best of {args.rounds})")
    ray.shutdown()

    big = args.workdir / f"headers-{args.index_classes}-{args.index_members}.tar"
    if not big.exists():
        header_only_tar(big, args.index_classes, args.index_members)
    for threads in (1, INDEX_THREADS):
        count, seconds = index_rate(big, threads)
        print(
            f"index {count:,} members in {args.index_classes} class tars, {threads} threads: {seconds:.2f} s "
            f"({count / seconds:,.0f} members/s; ImageNet's {IMAGENET_MEMBERS:,}: "
            f"~{IMAGENET_MEMBERS / count * seconds:.0f} s)"
        )
    print(f"archives_vs_tree_shard_ratio: {rates['archives'] / rates['tree']:.3f}")


if __name__ == "__main__":
    main()
