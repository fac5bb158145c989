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

Parallelism: one Ray task per shard (reads its files, preprocesses them on two threads,
writes its Parquet part and tar, returns counts and quarantine rows); the driver keeps at most
`max_in_flight` tasks pending, so memory is bounded by shards in flight, not by the
number of images. Plain tasks rather than Ray Data's read/map/write: the README's
benchmark section has the measurement.
"""

from __future__ import annotations

import collections
import csv
import functools
import io
import os
import shutil
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from pipeline.cluster import cluster_cpus
from pipeline.config import ShardParams
from pipeline.data.preprocess import Processed, preprocess_image
from pipeline.data.records import SPLITS, QuarantineRow, Record, read_record
from pipeline.data.shards import FORMATS, META, QUARANTINE, SCHEMA, ShardMeta, shard_path
from pipeline.storage import absolute, atomic_write_bytes, publish_dir, sync_paths

FMT_CHOICES = {"parquet": ("parquet",), "webdataset": ("webdataset",), "both": FORMATS}
TASK_THREADS = 2  # per shard task (see _task_threads)
QUARANTINE_HEADER = ("split", "path", "reason")


class TooManyBadFilesError(RuntimeError):
    """More inputs were quarantined than `max_bad_fraction` allows."""


@dataclass(frozen=True)
class _ShardJob:
    """One Ray task's work: the records of one shard and where its files go."""

    split: str
    index: int
    records: list[Record]
    staging: str
    formats: tuple[str, ...]
    size: int
    quality: int


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
        max_in_flight: Most shard tasks pending at once; default twice the cluster CPUs.
        progress: Show a tqdm bar (images, images/s).

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
    staging = _fresh_staging(out, formats)
    plan = plan_shards(records, settings.shard_size, settings.seed)
    jobs = [
        _ShardJob(split, i, recs, str(staging), formats, settings.size, settings.quality)
        for split in SPLITS
        for i, recs in enumerate(plan[split])
    ]
    start = time.perf_counter()
    results = _run_jobs(jobs, max_in_flight, progress)
    metrics, bad_rows = _summarise(plan, results, time.perf_counter() - start, quarantined)
    _write_quarantine(staging / QUARANTINE, bad_rows)
    if metrics["bad_fraction"] > settings.max_bad_fraction:
        for f in formats:
            shutil.rmtree(staging / f)
        publish_dir(staging, out)
        raise TooManyBadFilesError(
            f"{len(bad_rows)} of {sum(metrics['inputs'].values())} inputs quarantined (bad fraction "
            f"{metrics['bad_fraction']:.4%}) > max_bad_fraction={settings.max_bad_fraction}; "
            f"see {out / QUARANTINE}"
        )
    meta = _manifest(out, classes, names, settings, plan, results, metrics)
    atomic_write_bytes(staging / META, meta.to_json())
    publish_dir(staging, out)
    return metrics


def _manifest(
    out: Path, classes: Sequence[str], names: Sequence[str] | None, settings: ShardParams,
    plan: dict[str, list[list[Record]]], results: list[dict], metrics: dict,
) -> ShardMeta:  # fmt: skip
    """meta.json of a complete output: classes, counts, settings, every shard and its size."""
    formats = FMT_CHOICES[settings.format]
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
        shards={f: {s: [shard_path(f, s, i) for i in range(len(plan[s]))] for s in SPLITS} for f in formats},
        sizes={s: [r["sharded"] for r in results if r["split"] == s] for s in SPLITS},  # results in job order
    )


def _fresh_staging(out: Path, formats: tuple[str, ...]) -> Path:
    """An empty staging folder beside `out` with one subfolder per format and split."""
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    for f in formats:
        for split in SPLITS:
            (staging / f / split).mkdir(parents=True)
    return staging


def _summarise(
    plan: dict[str, list[list[Record]]],
    results: list[dict],
    seconds: float,
    quarantined: Sequence[QuarantineRow],
) -> tuple[dict, list[tuple[str, str, str]]]:
    """The stage's metrics and every quarantine row: ingestion's, then the shard tasks'."""
    inputs = {s: sum(len(r) for r in plan[s]) + sum(row[0] == s for row in quarantined) for s in SPLITS}
    bad_rows = [*quarantined, *(row for r in results for row in r["quarantine"])]
    total = sum(inputs.values())
    metrics = {
        "inputs": inputs,
        "sharded": {s: sum(r["sharded"] for r in results if r["split"] == s) for s in SPLITS},
        "quarantined": {s: sum(1 for row in bad_rows if row[0] == s) for s in SPLITS},
        "bad_fraction": len(bad_rows) / total,
        "seconds": seconds,
        "images_per_s": total / seconds,
        "shards_per_node": dict(collections.Counter(r["node"] for r in results)),  # Ray node id -> shards
    }
    return metrics, bad_rows


def warm_workers() -> list[ray.ObjectRef]:
    """Starts loading this module (torch included) into Ray's workers, without waiting.

    A worker's first shard task otherwise begins by importing torch, whose resize
    kernel preprocess_image uses: ~1.2 s here, a fixed cost per worker process that the
    shard stage hides behind listing the input tree. One task per cluster CPU, all
    pending at once, lands on every worker process the shard tasks will use.

    Returns:
        The tasks' refs; `ray.get` them to wait until the workers are ready.
    """
    task = ray.remote(_loaded)
    return [task.remote() for _ in range(cluster_cpus())]


def _loaded() -> None:
    """Ray task: nothing left to do, since running it imported this module."""


def _run_jobs(jobs: list[_ShardJob], max_in_flight: int | None, progress: bool) -> list[dict]:
    """Runs one Ray task per job, at most `max_in_flight` pending; results in job order.

    Every shard file and folder is on disk (fsynced) when this returns.
    """
    if max_in_flight is None:
        max_in_flight = 2 * cluster_cpus()
    remote = ray.remote(_write_shard)
    results: list[dict | None] = [None] * len(jobs)
    pending: dict[ray.ObjectRef, int] = {}
    bar = tqdm(total=sum(len(j.records) for j in jobs), unit="img", disable=not progress)
    next_job = 0
    with ThreadPoolExecutor(1, thread_name_prefix="fsync") as syncer:
        synced = []
        while next_job < len(jobs) or pending:
            while next_job < len(jobs) and len(pending) < max_in_flight:
                pending[remote.remote(jobs[next_job])] = next_job
                next_job += 1
            [done], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done)
            results[i] = ray.get(done)
            synced.append(syncer.submit(sync_paths, _job_files(jobs[i])))
            bar.update(len(jobs[i].records))
        for future in synced:
            future.result()  # re-raises a failed fsync
    bar.close()
    staging = Path(jobs[0].staging)
    sync_paths(staging / f / s for f in jobs[0].formats for s in SPLITS)
    return results


def _job_files(job: _ShardJob) -> list[Path]:
    """The files `_write_shard` writes for `job`, in `job.formats` order."""
    return [Path(job.staging) / shard_path(f, job.split, job.index) for f in job.formats]


def _write_shard(job: _ShardJob) -> dict:
    """Ray task body: preprocess one shard's records, write its files atomically."""
    kept: list[tuple[Record, Processed]] = []
    quarantine = []
    preprocess = functools.partial(_preprocess_record, size=job.size, quality=job.quality)
    for rec, result in _task_threads().map(preprocess, job.records):  # results in record order
        if isinstance(result, Processed):
            kept.append((rec, result))
        else:
            quarantine.append((rec.split, rec.path, result))
    for fmt, path in zip(job.formats, _job_files(job), strict=True):
        # fsync=False: _run_jobs fsyncs them on the driver (module docstring, "Atomicity").
        atomic_write_bytes(path, _ENCODERS[fmt](kept), fsync=False)
    return {
        "split": job.split,
        "index": job.index,
        "sharded": len(kept),
        "quarantine": quarantine,
        "node": ray.get_runtime_context().get_node_id(),  # where the work ran, for the stage metrics
    }


def _preprocess_record(rec: Record, size: int, quality: int) -> tuple[Record, Processed | str]:
    """One record -> its stored image, or the reason it goes to the quarantine report."""
    try:
        data = rec.pixels if rec.pixels is not None else read_record(rec)
    except OSError as err:
        return rec, f"unreadable file: {err}"
    result = preprocess_image(data, size=size, quality=quality)
    return rec, result if isinstance(result, Processed) else result.reason


@functools.cache
def _task_threads() -> ThreadPoolExecutor:
    """This worker process's preprocessing threads (TASK_THREADS), made once.

    `preprocess_image` releases the GIL (libjpeg-turbo, torch), so a shard task's second
    thread takes up whatever CPU time its worker would otherwise leave idle: while the
    other worker serialises and writes a shard or waits for its next task, and at the
    end, when the last task runs alone on a node that has a free core.
    """
    return ThreadPoolExecutor(TASK_THREADS, thread_name_prefix="preprocess")


def _parquet_bytes(kept: list[tuple[Record, Processed]]) -> memoryview:
    """One Parquet part: the SCHEMA columns, one row per kept image."""
    table = pa.table(
        {
            "key": [r.key for r, _ in kept],
            "label": [r.label for r, _ in kept],
            "wnid": [r.wnid for r, _ in kept],
            "jpeg": [p.jpeg for _, p in kept],
            "height": [p.height for _, p in kept],
            "width": [p.width for _, p in kept],
            "src_height": [p.src_height for _, p in kept],
            "src_width": [p.src_width for _, p in kept],
        },
        schema=SCHEMA,
    )
    buf = pa.BufferOutputStream()
    # JPEG bytes do not compress; the small columns are not worth a codec either.
    pq.write_table(table, buf, compression="none")
    return memoryview(buf.getvalue())  # pyarrow's buffer itself, not a bytes copy of it


def _tar_chunks(kept: list[tuple[Record, Processed]]) -> list[bytes]:
    """One WebDataset tar, <key>.jpg then <key>.cls (ascii label) per kept image, in pieces.

    Exactly the bytes `tarfile.open(mode="w")` writes for these members (TarInfo
    defaults: mtime 0, uid/gid 0, no user names, so reproducible), without its per-member
    file objects: each member is its header, its payload and zeros to the next 512-byte
    block; the archive ends with two zero blocks, padded to tarfile's 10240-byte record.
    """
    chunks: list[bytes] = []
    for rec, p in kept:
        for name, payload in ((f"{rec.key}.jpg", p.jpeg), (f"{rec.key}.cls", str(rec.label).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            chunks += [info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape"), payload]
            chunks.append(bytes(-len(payload) % tarfile.BLOCKSIZE))
    end = 2 * tarfile.BLOCKSIZE
    chunks.append(bytes(end + -(sum(map(len, chunks)) + end) % tarfile.RECORDSIZE))
    return chunks


_ENCODERS = {"parquet": _parquet_bytes, "webdataset": _tar_chunks}


def _write_quarantine(path: Path, rows: list[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(QUARANTINE_HEADER)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
