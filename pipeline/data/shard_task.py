"""One shard task, run in a Ray worker: a shard's records -> its files and a report.

`pipeline.data.shard_writer` plans the shards, runs one `write_shard` task per
`ShardJob` and makes the output trusted (fsyncs, meta.json, publishing); this module is
what each task does: read and preprocess the records, encode each format's file
(`shard_encoding`), name it by its SHA-256 in a shard store, and write it whole. A task
does not fsync (shard_writer's docstring, "Atomicity").
"""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import ray

from pipeline.data.preprocess import Processed, preprocess_image
from pipeline.data.records import QuarantineRow, Record, read_record
from pipeline.data.shard_encoding import encode
from pipeline.data.shards import shard_path
from pipeline.storage import join, write_file

TAIL_THREADS = 2  # preprocessing threads per task of the last wave (shard_writer, "Parallelism")


@dataclass(frozen=True)
class ShardJob:
    """One task's work: the records of one shard and where its files go."""

    split: str
    index: int
    records: list[Record]
    target: str  # where its files go: the local staging folder, or the shard store
    in_store: bool
    formats: tuple[str, ...]
    size: int
    quality: int
    threads: int  # preprocessing threads: 1, or TAIL_THREADS in the last wave

    def file(self, fmt: str, sha256: str) -> str:
        """Path or URI of this job's `fmt` file, whose content has `sha256`."""
        return join(self.target, shard_path(fmt, self.split, self.index, sha256 if self.in_store else ""))


class WrittenFile(NamedTuple):
    """One file a task wrote, as meta.json lists it."""

    nbytes: int
    sha256: str
    listed: str  # relative to the output folder, or the store's full URI


@dataclass(frozen=True)
class ShardReport:
    """What a task reports back for its job."""

    split: str
    index: int
    sharded: int  # images written
    files: list[WrittenFile]  # one per format, in the job's order
    quarantine: list[QuarantineRow]
    node: str  # Ray node id of where it ran, for the stage's metrics

    def written(self, job: ShardJob) -> list[str]:
        """The paths or URIs of the files written for `job`."""
        return [job.file(fmt, f.sha256) for fmt, f in zip(job.formats, self.files, strict=True)]


def write_shard(job: ShardJob) -> ShardReport:
    """Ray task body: preprocesses one shard's records and writes its files, each whole."""
    kept: list[tuple[Record, Processed]] = []
    quarantine = []
    for rec, result in _preprocess_records(job.records, job.size, job.quality, job.threads):
        if isinstance(result, Processed):
            kept.append((rec, result))
        else:
            quarantine.append((rec.split, rec.path, result))
    files = []
    for fmt in job.formats:
        pieces = encode(fmt, kept)
        digest = hashlib.sha256()
        for piece in pieces:
            digest.update(piece)
        uri = job.file(fmt, digest.hexdigest())
        write_file(uri, pieces, fsync=False)
        listed = uri if job.in_store else shard_path(fmt, job.split, job.index)
        files.append(WrittenFile(sum(map(len, pieces)), digest.hexdigest(), listed))
    node = ray.get_runtime_context().get_node_id()
    return ShardReport(job.split, job.index, len(kept), files, quarantine, node)


def load() -> None:
    """Ray task body: running it imported this module; an empty Parquet part sets up the writer."""
    encode("parquet", [])


def _preprocess_records(
    records: list[Record], size: int, quality: int, threads: int
) -> list[tuple[Record, Processed | str]]:
    """Every record's stored image or quarantine reason, in record order.

    With more threads, each loops over every `threads`-th record: a future per image
    would wake the task's thread (and pass the GIL) for every image.
    """

    def run(part: list[Record]) -> list[tuple[Record, Processed | str]]:
        return [_preprocess_record(rec, size, quality) for rec in part]

    if threads == 1:
        return run(records)
    parts = [_task_threads().submit(run, records[i::threads]) for i in range(threads)]
    results: list[tuple[Record, Processed | str]] = [None] * len(records)  # type: ignore[list-item]
    for i, part in enumerate(parts):
        results[i::threads] = part.result()
    return results


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
    """This worker process's TAIL_THREADS preprocessing threads, made once
    (`preprocess_image` releases the GIL in libjpeg-turbo and torch)."""
    return ThreadPoolExecutor(TAIL_THREADS, thread_name_prefix="preprocess")
