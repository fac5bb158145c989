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


def _tar_bytes(kept: list[tuple[Record, Processed]]) -> list[bytearray]:
    """One WebDataset tar, <key>.jpg then <key>.cls (ascii label) per kept image, in one piece.

    Exactly the bytes `tarfile.open(mode="w")` writes for these members (TarInfo
    defaults: mtime 0, uid/gid 0, no user names, so reproducible), without its per-member
    objects: each member is its header, its payload and zeros to the next 512-byte block;
    the archive ends with two zero blocks, padded to tarfile's 10240-byte record. One
    buffer, so the file is hashed and written in one call each rather than per piece.
    """
    out = bytearray()
    for rec, p in kept:
        for name, payload in ((f"{rec.key}.jpg", p.jpeg), (f"{rec.key}.cls", str(rec.label).encode())):
            out += _tar_header(name, len(payload))
            out += payload
            out += bytes(-len(payload) % tarfile.BLOCKSIZE)
    end = 2 * tarfile.BLOCKSIZE
    out += bytes(end + -(len(out) + end) % tarfile.RECORDSIZE)
    return [out]


def _tar_header(name: str, size: int) -> bytes:
    """The header tarfile writes for a regular member `name` of `size` bytes.

    tarfile's default (PAX) format writes a plain 512-byte ustar header for a short ASCII
    name and a size below 8 GiB, filled in here; anything else needs its extended header,
    which tarfile itself then makes.
    """
    if not name.isascii() or len(name) >= tarfile.LENGTH_NAME or size >= 8**11:
        return _tarfile_header(name, size)
    header = bytearray(_USTAR_TEMPLATE)
    header[: len(name)] = name.encode("ascii")
    header[124:136] = b"%011o\0" % size
    # The checksum: the sum of the header's bytes with its own field read as spaces
    # (which the template holds), as six octal digits, NUL, space.
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _tarfile_header(name: str, size: int) -> bytes:
    """tarfile's own header (with any extended header) for a regular member."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")


def _ustar_template() -> bytes:
    """tarfile's header of an empty member with an empty name, its checksum field as
    spaces: every field but those `_tar_header` fills in (name, size, checksum)."""
    header = bytearray(_tarfile_header("", 0))
    header[148:156] = b" " * 8
    return bytes(header)


_USTAR_TEMPLATE = _ustar_template()


_ENCODERS: dict[str, Callable[[list[tuple[Record, Processed]]], list]] = {
    "parquet": _parquet_bytes,
    "webdataset": _tar_bytes,
}
