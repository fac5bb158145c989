"""Benchmark of the shard stage writing its shards to an S3 server against local disk.

Starts its own S3 server (moto's, `cli.services.start_s3`, on 127.0.0.1), generates (once,
cached in --workdir) the sample as a tree, then runs `write_shards` on Ray with all cores
(both formats) in turns, best of --rounds: shards into a local folder (fsynced, as the
stage does) and shards into `s3://alexnet/...` (`data.shard_store`; meta.json local).
Workers are warm and ingestion is not timed. The S3 server runs on this machine and takes
CPU from the shard tasks, so the ratio is a floor for a store on other machines.

The last line is `s3_vs_local_shard_ratio: X` (images/s to S3 over images/s to disk).

Usage: .venv/bin/python benchmarks/shard_storage.py [--classes 10] [--train-per-class 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import ray

from cli.services import remove_all, start_s3
from pipeline.cluster import start_local_ray
from pipeline.config import SampleParams, ShardParams
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.sample import generate_sample
from pipeline.data.shard_writer import warm_workers, write_shards


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/alexnet-shard-storage-bench"))
    args = ap.parse_args(argv)
    print(f"load avg before: {os.getloadavg()[0]:.1f}", flush=True)
    params = SampleParams(args.classes, args.train_per_class, args.val_per_class)
    tree = args.workdir / f"tree-{args.classes}-{args.train_per_class}-{args.val_per_class}"
    if not tree.exists():
        generate_sample(tree, params)
    catalog = ingest_imagenet(str(tree))
    n = len(catalog.records)

    s3 = start_s3("127.0.0.1", Path(tempfile.mkdtemp(prefix="s3-bench-")))
    try:
        os.environ.update(s3.env())  # before Ray starts: its workers inherit the credentials
        start_local_ray(num_cpus=args.workers, quiet=True)
        ray.get(warm_workers())
        settings = ShardParams(size=128, format="both", shard_size=250, max_bad_fraction=0.01)
        kw = {"classes": catalog.classes, "settings": settings, "quarantined": catalog.quarantine}
        rates = {"local": 0.0, "s3": 0.0}
        for _ in range(args.rounds):  # in turns, so load from other processes hits both alike
            for where in rates:
                out = args.workdir / f"shards-{where}"
                # A fresh prefix per run: every object is a new upload, as in a first run.
                store = f"s3://alexnet/bench-{uuid.uuid4().hex[:8]}" if where == "s3" else ""
                start = time.perf_counter()
                write_shards(catalog.records, out, progress=False, store=store, **kw)
                rates[where] = max(rates[where], n / (time.perf_counter() - start))
        mb = sum(p.stat().st_size for p in (args.workdir / "shards-local").rglob("*") if p.is_file()) / 1e6
        for where, rate in rates.items():
            print(f"shard to {where}: {rate:.0f} images/s ({n} images, {mb:.0f} MB, {args.workers} workers)")
        ray.shutdown()
    finally:
        remove_all((s3.process,), ())
        shutil.rmtree(args.workdir / "shards-local", ignore_errors=True)
    print(f"s3_vs_local_shard_ratio: {rates['s3'] / rates['local']:.3f}")


if __name__ == "__main__":
    main()
