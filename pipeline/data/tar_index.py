"""Indexing a tar archive in place: each member's name, kind and data byte range.

One pass over the headers: `tarfile` parses each header (ustar, GNU long names, pax),
`RangeReader` feeds it and skips the data (see `archive_io.LOCAL_FETCH`). A tar inside a
tar is indexed the same way over its byte range, so offsets are always absolute in the
outer file and a member is later read with one ranged read.

tarfile stops without a word at a damaged header after the first, and at the end of the
file; this module checks where it stopped instead: an intact tar ends with a zero block
(its end-of-archive marker). Anything else is reported as damage, with the members
before it kept.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

import pyarrow as pa

from pipeline.data.archive_io import RangeReader

_BLOCK = tarfile.BLOCKSIZE  # 512 bytes


@dataclass(frozen=True, slots=True)
class TarMember:
    """One member of a tar.

    Attributes:
        name: Its name as stored (any string: nothing is extracted).
        offset: Its first data byte, in the archive file.
        size: Its data bytes.
        problem: None for a whole regular file; else why it cannot be an input
            ("not a regular file: symbolic link to 'x'", "truncated: ...").
    """

    name: str
    offset: int
    size: int
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class TarListing:
    """A tar's members in stored order, and why the walk stopped early (None: it did not)."""

    members: list[TarMember]
    damage: str | None


def index_tar(handle: pa.NativeFile, start: int, length: int, fetch: int) -> TarListing:
    """Lists the tar occupying bytes [start, start + length) of an open archive file.

    Args:
        handle: The archive file (`archive_io.open_archive`).
        start: Byte offset of the tar in it (0, or an inner tar's data offset).
        length: The tar's size in bytes.
        fetch: Bytes per read (`archive_io.fetch_size`).

    Returns:
        The listing; `damage` says, with the byte offset, where an unreadable header or
        the end of the data cut the walk short.
    """
    reader = RangeReader(handle, start, length, fetch)
    members: list[TarMember] = []
    try:
        with tarfile.open(fileobj=reader, mode="r:") as tar:  # type: ignore[call-overload]
            for info in tar:
                problem = _problem(info, length)
                members.append(TarMember(info.name, start + info.offset_data, info.size, problem))
            stop = tar.offset
    except tarfile.TarError as err:
        at = members[-1].offset - start + members[-1].size if members else 0
        return TarListing(members, f"damaged tar: {err} (after byte {at})")
    reader.seek(stop)
    block = reader.read(_BLOCK)
    if len(block) == _BLOCK and block.count(0) == _BLOCK:
        return TarListing(members, None)
    if not block:
        return TarListing(members, f"damaged tar: ends at byte {stop} without its end-of-archive marker")
    return TarListing(members, f"damaged tar: unreadable header at byte {stop}")


def _problem(info: tarfile.TarInfo, length: int) -> str | None:
    """Why a member cannot be an input, or None for a whole regular file."""
    kind = _kind(info)
    if kind is not None:
        return f"not a regular file: {kind}"
    if info.offset_data + info.size > length:
        return f"truncated: its {info.size} bytes run past the end of the tar"
    return None


def _kind(info: tarfile.TarInfo) -> str | None:
    """What a member is if not a regular file, else None."""
    if info.issym():
        return f"symbolic link to {info.linkname!r}"
    if info.islnk():
        return f"hard link to {info.linkname!r}"
    if info.isdir():
        return "directory"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "FIFO"
    if info.issparse() or not info.isreg():
        return f"tar member of type {info.type!r}"
    return None
