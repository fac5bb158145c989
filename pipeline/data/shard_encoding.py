"""Shard files' bytes: one Parquet part or one WebDataset tar from a shard's images.

The format itself (columns, member names, layout) is `pipeline.data.shards`. Both
encoders are deterministic: the same images give the same bytes on every run.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.preprocess import Processed
from pipeline.data.records import Record
from pipeline.data.shards import SCHEMA


def encode(fmt: str, kept: list[tuple[Record, Processed]]) -> list[bytes | memoryview]:
    """A shard file's bytes in `fmt` ("parquet" or "webdataset"), as pieces to write in order.

    Args:
        fmt: The format.
        kept: The shard's records with their stored images, in shard order.
    """
    return _ENCODERS[fmt](kept)


def _parquet_bytes(kept: list[tuple[Record, Processed]]) -> list[memoryview]:
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
    return [memoryview(buf.getvalue())]  # pyarrow's buffer itself, not a bytes copy of it


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


_ENCODERS: dict[str, Callable[[list[tuple[Record, Processed]]], list]] = {
    "parquet": _parquet_bytes,
    "webdataset": _tar_chunks,
}
