"""Writing shards on Ray: ingested records -> Parquet parts and WebDataset tars.

The format and its manifest are `pipeline.data.shards`. Train records are shuffled with
`seed` before being cut into shards of `shard_size` inputs (so shards are class-mixed);
val keeps its official order. Quarantined inputs leave a gap, so a shard holds at most
`shard_size` images.

Atomicity: everything is written into a fresh sibling staging folder
(`.<name>.staging`, wiped first, so nothing from an interrupted run is ever reused);
each shard there is written under a temporary name and renamed when whole, meta.json is
written last, and the staging folder then replaces `out_dir` (`storage.publish_dir`). A
run interrupted at any point leaves either the previous output or nothing usable under
`out_dir` (no meta.json), and a rerun produces the same bytes as a clean run. The shard
tasks do not fsync: a driver thread fsyncs each shard's files as its task reports, while
the workers go on computing, and the folders after the last shard, all before meta.json
is written (a worker waiting on its own fsyncs left its core idle).

With a shard store (`store`: an s3:// prefix, or a folder), the shard tasks write their
files straight there instead, each named after its content (`shards.shard_path` with
the file's SHA-256): a rerun writes the same bytes under the same names, so the manifest
comes out identical, and different bytes never replace a file another manifest lists.
An object appears whole or not at all (storage.write_file), and only meta.json, written
last into the local `out_dir` (published as above), makes files trusted: those of an
interrupted run are never listed, and the previous meta.json keeps pointing at its own
files, which stay readable. Nothing is deleted from the store (other clones or
experiments may list those files).

Parallelism: one Ray task per shard (`shard_task.write_shard`: reads and preprocesses its
files, writes its Parquet part and tar, reports counts and quarantine rows); the last
wave's tasks (one per cluster CPU) preprocess on TAIL_THREADS threads, so cores whose
tasks are done help the last ones finish (the others keep one: a second thread costs CPU
in handing over the GIL); the driver keeps at most `max_in_flight` tasks pending, so
memory is bounded by shards in flight, not by the number of images. Plain tasks rather
than Ray Data's read/map/write: the README's benchmark section has the measurement.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from pipeline.cluster import cluster_cpus, spread_over_nodes
from pipeline.config import ShardParams
from pipeline.data.records import SPLITS, QuarantineRow, Record
from pipeline.data.shard_task import TAIL_THREADS, ShardJob, ShardReport, WrittenFile, load, write_shard
from pipeline.data.shards import FORMATS, META, QUARANTINE, ShardMeta
from pipeline.storage import absolute, atomic_write_bytes, is_remote, publish_dir, sync_paths

FMT_CHOICES = {"parquet": ("parquet",), "webdataset": ("webdataset",), "both": FORMATS}
QUARANTINE_HEADER = ("split", "path", "reason")


class TooManyBadFilesError(RuntimeError):
    """More inputs were quarantined than `max_bad_fraction` allows."""


def plan_shards(records: Sequence[Record], shard_size: int, seed: int) -> dict[str, list[list[Record]]]:
    """Cuts records into shards: train shuffled with `seed` first, val in given order.

    Args:
        records: Ingested records of any splits in SPLITS.
        shard_size: Inputs per shard.
        seed: Seed of the train shuffle.

    Returns:
        {split: [records of shard 0, of shard 1, ...]} for every split in SPLITS.
    """
    plan = {}
    for split in SPLITS:
        recs = [r for r in records if r.split == split]
        if split == "train":
            recs = [recs[i] for i in np.random.default_rng(seed).permutation(len(recs))]
        plan[split] = [recs[i : i + shard_size] for i in range(0, len(recs), shard_size)]
    return plan


def write_shards(
    records: Sequence[Record],
    out_dir: str | os.PathLike[str],
    *,
    classes: Sequence[str],
    names: Sequence[str] | None = None,
    settings: ShardParams,
    quarantined: Sequence[QuarantineRow] = (),
    max_in_flight: int | None = None,
    progress: bool = True,
    store: str = "",
) -> dict:
    """Preprocesses records into shards in parallel on Ray (see the module docstring).

    Starts a local Ray if the caller has not. `out_dir` is a local (or shared, on a
    cluster) path; it is replaced as a whole when the run succeeds.

    Args:
        records: From `pipeline.data.imagenet.ingest_imagenet` / `cifar.ingest_cifar10`.
        out_dir: Output folder.
        classes: Wnids (or class names) in label order, for meta.json.
        names: Human-readable class names in label order; defaults to `classes`.
        settings: The `shard` params: image size, quality, format, shard size, shuffle
            seed, bad-file limit (`source` is the caller's business).
        quarantined: Inputs ingestion already quarantined (`Catalog.quarantine`):
            reported and counted as inputs with the shard tasks' own.
        max_in_flight: Most shard tasks pending at once; default the cluster's CPUs.
        progress: Show a tqdm bar (images, images/s).
        store: Where the shard files go ("": inside `out_dir`; else an object-store
            prefix or a folder, see the module docstring). `out_dir` then gets only
            meta.json, listing their URIs, and quarantine.csv.

    Returns:
        Metrics: inputs, sharded, quarantined ({split: count} each), bad_fraction,
        seconds, images_per_s, shards_per_node (Ray node id -> shard tasks it ran).

    Raises:
        ValueError: No records.
        TooManyBadFilesError: bad_fraction > max_bad_fraction; raised after
            `out_dir/quarantine.csv` is written (out_dir then holds only that file).
    """
    if not records:
        raise ValueError("no records to shard")
    out = Path(absolute(os.fspath(out_dir)))  # the shard tasks run in their own cwd
    formats = FMT_CHOICES[settings.format]
    staging = _fresh_staging(out, () if store else formats)
    plan = plan_shards(records, settings.shard_size, settings.seed)
    target = absolute(store) if store else str(staging)
    shards = [(split, i, recs) for split in SPLITS for i, recs in enumerate(plan[split])]
    cpus = cluster_cpus()
    last_wave = len(shards) - cpus
    jobs = [
        ShardJob(
            split, i, recs, target, bool(store), formats, settings.size, settings.quality,
            threads=TAIL_THREADS if n >= last_wave else 1,
        )
        for n, (split, i, recs) in enumerate(shards)
    ]  # fmt: skip
    start = time.perf_counter()
    results = _run_jobs(jobs, max_in_flight or cpus, progress)
    metrics, bad_rows = _summarise(plan, results, time.perf_counter() - start, quarantined)
    _write_quarantine(staging / QUARANTINE, bad_rows)
    if metrics["bad_fraction"] > settings.max_bad_fraction:
        for f in formats:
            shutil.rmtree(staging / f, ignore_errors=True)
        publish_dir(staging, out)
        raise TooManyBadFilesError(
            f"{len(bad_rows)} of {sum(metrics['inputs'].values())} inputs quarantined (bad fraction "
            f"{metrics['bad_fraction']:.4%}) > max_bad_fraction={settings.max_bad_fraction}; "
            f"see {out / QUARANTINE}"
        )
    meta = _manifest(out, classes, names, settings, results, metrics)
    atomic_write_bytes(staging / META, meta.to_json())
    publish_dir(staging, out)
    return metrics


def _manifest(
    out: Path, classes: Sequence[str], names: Sequence[str] | None, settings: ShardParams,
    results: list[ShardReport], metrics: dict,
) -> ShardMeta:  # fmt: skip
    """meta.json of a complete output: classes, counts, settings, every shard file with its
    image count, length and SHA-256 (results in shard order)."""
    formats = FMT_CHOICES[settings.format]

    def per_file(value: Callable[[WrittenFile], object]) -> dict[str, dict[str, list]]:
        return {
            fmt: {s: [value(r.files[k]) for r in results if r.split == s] for s in SPLITS}
            for k, fmt in enumerate(formats)
        }

    return ShardMeta(
        root=str(out),
        classes=list(classes),
        names=list(names if names is not None else classes),
        counts=metrics["sharded"],
        inputs=metrics["inputs"],
        quarantined=metrics["quarantined"],
        size=settings.size,
        quality=settings.quality,
        format=settings.format,
        shard_size=settings.shard_size,
        seed=settings.seed,
        shards=per_file(lambda f: f.listed),
        sizes={s: [r.sharded for r in results if r.split == s] for s in SPLITS},
        nbytes=per_file(lambda f: f.nbytes),
        sha256=per_file(lambda f: f.sha256),
    )


def _fresh_staging(out: Path, formats: tuple[str, ...]) -> Path:
    """An empty staging folder beside `out` with one subfolder per format and split."""
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in formats:
        for split in SPLITS:
            (staging / f / split).mkdir(parents=True)
    return staging


def _summarise(
    plan: dict[str, list[list[Record]]],
    results: list[ShardReport],
    seconds: float,
    quarantined: Sequence[QuarantineRow],
) -> tuple[dict, list[tuple[str, str, str]]]:
    """The stage's metrics and every quarantine row: ingestion's, then the shard tasks'."""
    inputs = {s: sum(len(r) for r in plan[s]) + sum(row[0] == s for row in quarantined) for s in SPLITS}
    bad_rows = [*quarantined, *(row for r in results for row in r.quarantine)]
    total = sum(inputs.values())
    metrics = {
        "inputs": inputs,
        "sharded": {s: sum(r.sharded for r in results if r.split == s) for s in SPLITS},
        "quarantined": {s: sum(1 for row in bad_rows if row[0] == s) for s in SPLITS},
        "bad_fraction": len(bad_rows) / total,
        "seconds": seconds,
        "images_per_s": total / seconds,
        "shards_per_node": dict(collections.Counter(r.node for r in results)),  # Ray node id -> shards
    }
    return metrics, bad_rows


def warm_workers() -> list[ray.ObjectRef]:
    """Starts loading this module (torch included) into Ray's workers, without waiting.

    A worker's first shard task otherwise begins by importing torch, whose resize
    kernel preprocess_image uses (~1.2 s here), and by pyarrow setting up its Parquet
    writer on the first part it writes (~0.25 CPU s): fixed costs per worker process
    that the shard stage hides behind listing the input tree. One task per cluster CPU, all
    pending at once and dealt out to the nodes as the shard tasks will be, lands on every
    worker process the shard tasks will use.

    Returns:
        The tasks' refs; `ray.get` them to wait until the workers are ready.
    """
    task = ray.remote(load)
    return [task.options(scheduling_strategy=s).remote() for s in spread_over_nodes(cluster_cpus())]


def _run_jobs(jobs: list[ShardJob], max_in_flight: int, progress: bool) -> list[ShardReport]:
    """Runs one Ray task per job, at most `max_in_flight` pending; results in job order.

    Every shard file and folder is on disk (fsynced) when this returns.
    """
    remote = ray.remote(write_shard)
    # One slot per task in flight, dealt out to the nodes by their CPUs; a finished task's
    # slot takes the next job, so a node gets work as it frees a core.
    free_slots = collections.deque(spread_over_nodes(max_in_flight))
    results: list[ShardReport] = [None] * len(jobs)  # type: ignore[list-item]
    pending: dict[ray.ObjectRef, tuple[int, object]] = {}  # -> (job index, its slot)
    bar = tqdm(total=sum(len(j.records) for j in jobs), unit="img", disable=not progress)
    todo = iter(range(len(jobs)))

    def launch() -> None:  # the next jobs into the free slots
        while free_slots and (n := next(todo, None)) is not None:
            slot = free_slots.popleft()
            pending[remote.options(scheduling_strategy=slot).remote(jobs[n])] = (n, slot)

    launch()
    with ThreadPoolExecutor(1, thread_name_prefix="fsync") as syncer:
        synced = []
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            i, slot = pending.pop(done)
            free_slots.append(slot)
            launch()  # before handing the fsync over: that thread taking the GIL would delay it
            results[i] = ray.get(done)
            if not is_remote(jobs[i].target):  # an object is durable once its upload completed
                synced.append(syncer.submit(sync_paths, results[i].written(jobs[i])))
            bar.update(len(jobs[i].records))
        for future in synced:
            future.result()  # re-raises a failed fsync
    bar.close()
    if not is_remote(jobs[0].target):
        written = (uri for job, r in zip(jobs, results, strict=True) for uri in r.written(job))
        sync_paths({str(Path(uri).parent) for uri in written})
    return results


def _write_quarantine(path: Path, rows: list[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(QUARANTINE_HEADER)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
