"""Reading inputs where they lie inside tar and zip archives: byte ranges, never extraction.

A member of an archive is read by its byte range: `open_archive` opens the archive file
(a local path or a `pyarrow.fs` URI) once per process, and `read_member` reads one member
with one ranged read (`read_at`: a pread on a local disk, an HTTP range GET on object
storage), inflating zip entries and checking their CRC-32. Nothing is ever written, so a
member's name cannot reach the file system. `RangeReader` gives the tar indexer a
seekable view of one byte range (each inner tar of ILSVRC2012_img_train.tar is a range
of it).
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data.pickling import pickled_by_fields
from pipeline.storage import absolute, resolve

ZIP_STORED, ZIP_DEFLATED = 0, 8
LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
# Zip local header: signature, version, flags, method, time, date, crc, sizes, name and
# extra lengths (30 bytes; the name and extra field follow it, then the data).
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
# Bytes read past a zip local header in the same request, for its name and extra field
# (ImageNet's names are under 60 bytes, extra fields under 40), so one request usually
# returns header and data together.
_LOCAL_SLACK = 1024
# Read size of the tar indexer. Locally, 1 KiB per header (the 512-byte header and the
# byte before it, which tarfile reads to detect truncation), seeking past the data. On
# object storage, where each request waits tens of ms, reads of 4 MiB stream through
# the data instead and catch many headers per request.
LOCAL_FETCH = 1024
REMOTE_FETCH = 4 << 20


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    """An archive file as it was when indexed.

    Attributes:
        uri: Local absolute path or URI.
        size: Bytes.
        mtime_ns: Modification time (None where the file system has none): a process
            reuses a handle it opened only for the same uri, size and mtime.
    """

    uri: str
    size: int
    mtime_ns: int | None


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class ZipCoding:
    """How a zip entry's bytes are stored.

    Attributes:
        method: ZIP_STORED or ZIP_DEFLATED.
        crc32: CRC-32 of the uncompressed bytes.
        file_size: Uncompressed bytes.
    """

    method: int
    crc32: int
    file_size: int


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Location:
    """Where one input's bytes lie inside an archive.

    Attributes:
        archive: The archive file.
        offset: Tar: the member's first data byte. Zip: its local header (the data
            follows the header's name and extra field, whose lengths only the local
            header gives).
        size: Bytes stored: the tar member's size, or the zip entry's compressed size.
        zip: None for a tar member; how the zip entry is stored otherwise.
    """

    archive: ArchiveFile
    offset: int
    size: int
    zip: ZipCoding | None = None


def stat_archive(uri: str) -> ArchiveFile:
    """The archive file at `uri` (a local path made absolute), with its size and mtime.

    Raises:
        FileNotFoundError: `uri` is not a regular file.
    """
    uri = absolute(uri)
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no file {uri}")
    return ArchiveFile(uri, info.size, info.mtime_ns)


def fetch_size(uri: str) -> int:
    """The tar indexer's read size for an archive at `uri` (see LOCAL_FETCH)."""
    fs, _ = resolve(uri)
    return LOCAL_FETCH if isinstance(fs, pafs.LocalFileSystem) else REMOTE_FETCH


@functools.lru_cache(maxsize=16)
def open_archive(archive: ArchiveFile) -> pa.NativeFile:
    """A random-access handle on `archive`, opened once per process and file version.

    `read_at` on it is thread-safe. Shard tasks read members of the same few archives,
    so the handle (and, on S3, the HEAD request of opening it) is shared by every read.

    Raises:
        OSError: The file cannot be opened, or its size differs from when it was indexed.
    """
    fs, path = resolve(archive.uri)
    handle = fs.open_input_file(path)
    if handle.size() != archive.size:
        raise OSError(f"{archive.uri}: {handle.size()} bytes, {archive.size} when indexed: it changed")
    return handle


def read_member(loc: Location) -> bytes:
    """The bytes of one archive member (a zip entry inflated and checked).

    Raises:
        OSError: The archive cannot be read, ends before the member does, or the zip
            entry is damaged (no local header, bad deflate stream, wrong size or CRC).
    """
    handle = open_archive(loc.archive)
    if loc.zip is None:
        return _read_exactly(handle, loc, loc.offset, loc.size)
    head = handle.read_at(_LOCAL_HEADER.size + _LOCAL_SLACK + loc.size, loc.offset)
    if len(head) < _LOCAL_HEADER.size or head[:4] != LOCAL_HEADER_SIGNATURE:
        raise OSError(f"{loc.archive.uri}: no zip local header at byte {loc.offset}")
    name_len, extra_len = _LOCAL_HEADER.unpack_from(head)[-2:]
    start = _LOCAL_HEADER.size + name_len + extra_len
    data = head[start : start + loc.size]
    if len(data) < loc.size:
        data += _read_exactly(handle, loc, loc.offset + start + len(data), loc.size - len(data))
    return _decode_zip(data, loc.zip, f"{loc.archive.uri}: zip entry at byte {loc.offset}")


def _read_exactly(handle: pa.NativeFile, loc: Location, offset: int, size: int) -> bytes:
    data = handle.read_at(size, offset)
    if len(data) != size:
        raise OSError(f"{loc.archive.uri}: ends at byte {offset + len(data)}, in the member at {loc.offset}")
    return data


def _decode_zip(data: bytes, coding: ZipCoding, where: str) -> bytes:
    """Inflates (ZIP_DEFLATED) and checks size and CRC-32 of a zip entry's stored bytes."""
    if coding.method == ZIP_DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, no zlib header
        try:
            # One byte over the declared size is enough to see a stream that claims less
            # than it holds, without inflating the rest of it.
            data = inflater.decompress(data, coding.file_size + 1)
        except zlib.error as err:
            raise OSError(f"{where}: bad deflate stream: {err}") from None
        if not inflater.eof:
            raise OSError(f"{where}: deflate stream cut short or longer than its {coding.file_size} bytes")
    if len(data) != coding.file_size:
        raise OSError(f"{where}: {len(data)} bytes, the central directory says {coding.file_size}")
    if zlib.crc32(data) != coding.crc32:
        raise OSError(f"{where}: CRC-32 mismatch")
    return data


class RangeReader:
    """A read-only, seekable file object over bytes [start, start + length) of a handle.

    Reads at least `fetch` bytes per request and serves later reads from them (tarfile
    reads 512-byte headers and single bytes).
    """

    def __init__(self, handle: pa.NativeFile, start: int, length: int, fetch: int) -> None:
        self._handle, self._start, self._length, self._fetch = handle, start, length, fetch
        self._pos = 0
        self._buf, self._buf_pos = b"", 0

    def tell(self) -> int:
        """Position relative to the range's start."""
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        """Moves to `pos` from the start (whence 0), the position (1) or the end (2)."""
        base = (0, self._pos, self._length)[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all that is left if negative); b"" at the range's end."""
        end = self._length if size is None or size < 0 else min(self._length, self._pos + size)
        if end <= self._pos:
            return b""
        if not (self._buf_pos <= self._pos and end <= self._buf_pos + len(self._buf)):
            want = min(self._length, max(end, self._pos + self._fetch)) - self._pos
            self._buf, self._buf_pos = self._handle.read_at(want, self._start + self._pos), self._pos
        data = self._buf[self._pos - self._buf_pos : end - self._buf_pos]
        self._pos += len(data)
        return data
