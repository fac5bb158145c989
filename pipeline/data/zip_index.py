"""Indexing a zip archive from its central directory: each entry's name, kind and byte range.

Reads the end-of-central-directory record (zip64 too: Kaggle's ImageNet zip is 155 GB)
and then the central directory in large sequential reads, keeping one small `ZipEntry`
per entry (zipfile.ZipFile would hold a ZipInfo per entry of the 1.9 million, and needs
a seekable file object over the whole archive). The data offset of an entry depends on
its local header, which `archive_io.read_member` reads in the same request as the data.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from pipeline.data.archive_io import ZIP_DEFLATED, ZIP_STORED

_EOCD = struct.Struct("<4s4H2IH")  # end of central directory: 22 bytes + comment
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes, just before the EOCD record
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2I4Q")  # 56 bytes
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
_ENTRY = struct.Struct("<4s6H3I5H2I")  # central directory file header: 46 bytes + name, extra, comment
_ENTRY_SIGNATURE = b"PK\x01\x02"
_ZIP64_EXTRA_ID = 0x0001
_MAX_COMMENT = 0xFFFF
_CHUNK = 16 << 20  # central directory bytes per read
_UNIX = 3  # "version made by" high byte of entries written on Unix (mode bits in external_attr)


@dataclass(frozen=True, slots=True)
class ZipEntry:
    """One central directory entry.

    Attributes:
        name: Its name as stored (any string: nothing is extracted).
        header_offset: Byte offset of its local header in the archive.
        compressed_size: Stored bytes.
        file_size: Uncompressed bytes.
        method: Compression method (0 stored, 8 deflated).
        crc32: CRC-32 of the uncompressed bytes.
        is_dir: A folder entry (it holds no data).
        problem: None for a regular file this reader can read; else why not
            ("not a regular file: symbolic link", "encrypted", ...).
    """

    name: str
    header_offset: int
    compressed_size: int
    file_size: int
    method: int
    crc32: int
    is_dir: bool = False
    problem: str | None = None


def index_zip(handle: pa.NativeFile, uri: str) -> list[ZipEntry]:
    """Lists a zip archive's entries in central directory order.

    Args:
        handle: The archive file (`archive_io.open_archive`).
        uri: Its path or URI, for error messages.

    Returns:
        One entry per central directory record.

    Raises:
        ValueError: Not a zip file, a multi-disk one, or a damaged central directory
            (the message names the file and the byte offset).
    """
    cd_offset, cd_size, count = _central_directory(handle, uri)
    entries = list(_entries(handle, uri, cd_offset, cd_size))
    if len(entries) != count:
        raise ValueError(f"{uri}: central directory has {len(entries)} entries, its end record says {count}")
    return entries


def _central_directory(handle: pa.NativeFile, uri: str) -> tuple[int, int, int]:
    """(offset, size, entry count) of the central directory, zip64 values where present."""
    size = handle.size()
    tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
    tail = handle.read_at(size - tail_start, tail_start)
    at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        raise ValueError(f"{uri}: not a zip file (no end-of-central-directory record)")
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    if (disk, cd_disk) != (0, 0):
        raise ValueError(f"{uri}: a multi-disk zip archive; expected a single file")
    if count != 0xFFFF and 0xFFFFFFFF not in (cd_size, cd_offset):
        return cd_offset, cd_size, count
    locator_at = tail_start + at - _ZIP64_LOCATOR.size
    signature, _, eocd64_at, _ = _ZIP64_LOCATOR.unpack(handle.read_at(_ZIP64_LOCATOR.size, locator_at))
    record = handle.read_at(_ZIP64_EOCD.size, eocd64_at)
    if signature != _ZIP64_LOCATOR_SIGNATURE or record[:4] != _ZIP64_EOCD_SIGNATURE:
        raise ValueError(f"{uri}: zip64 end-of-central-directory record missing (before byte {locator_at})")
    _, _, _, _, _, _, _, count64, cd_size64, cd_offset64 = _ZIP64_EOCD.unpack(record)
    return cd_offset64, cd_size64, count64


def _entries(handle: pa.NativeFile, uri: str, cd_offset: int, cd_size: int) -> Iterator[ZipEntry]:
    """Parses the central directory, reading it in _CHUNK pieces."""
    buf, buf_at, pos, end = b"", cd_offset, cd_offset, cd_offset + cd_size

    def need(n: int) -> bytes:
        nonlocal buf, buf_at
        if pos + n > buf_at + len(buf):
            loaded = buf_at + len(buf)
            buf = buf[pos - buf_at :] + handle.read_at(min(_CHUNK, end - loaded), loaded)
            buf_at = pos
        if pos + n > buf_at + len(buf):
            raise ValueError(f"{uri}: central directory ends inside the entry at byte {pos}")
        return buf[pos - buf_at : pos - buf_at + n]

    while pos < end:
        fixed = need(_ENTRY.size)
        (signature, made_by, _, flags, method, _, _, crc, csize, usize,
         name_len, extra_len, comment_len, _, _, external, offset) = _ENTRY.unpack(fixed)  # fmt: skip
        if signature != _ENTRY_SIGNATURE:
            raise ValueError(f"{uri}: damaged central directory at byte {pos}")
        variable = need(_ENTRY.size + name_len + extra_len + comment_len)[_ENTRY.size :]
        raw_name, extra = variable[:name_len], variable[name_len : name_len + extra_len]
        # Bit 11: the name is UTF-8; else it is code page 437, as zipfile reads it.
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", errors="surrogateescape")
        usize, csize, offset = _zip64_values(extra, usize, csize, offset)
        mode = external >> 16 if made_by >> 8 == _UNIX else 0
        is_dir = name.endswith("/") or stat.S_ISDIR(mode)
        problem = _problem(is_dir, mode, flags, method)
        yield ZipEntry(name, offset, csize, usize, method, crc, is_dir, problem)
        pos += _ENTRY.size + name_len + extra_len + comment_len


def _zip64_values(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset from the zip64 extra field, for those stored as 0xFFFFFFFF."""
    at = 0
    while at + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, at)
        if field_id == _ZIP64_EXTRA_ID:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            usize = next(values) if usize == 0xFFFFFFFF else usize
            csize = next(values) if csize == 0xFFFFFFFF else csize
            offset = next(values) if offset == 0xFFFFFFFF else offset
            break
        at += 4 + length
    return usize, csize, offset


def _problem(is_dir: bool, mode: int, flags: int, method: int) -> str | None:
    """Why an entry cannot be an input, or None (`mode`: Unix mode bits, 0 if none)."""
    if is_dir:
        return "not a regular file: directory"
    if stat.S_ISLNK(mode):
        return "not a regular file: symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # zipfile.writestr stores 0o600, no type bits
        return f"not a regular file: mode {mode:o}"
    if flags & 0x1:
        return "encrypted"
    if method not in (ZIP_STORED, ZIP_DEFLATED):
        return f"compression method {method}: only stored ({ZIP_STORED}) and deflated ({ZIP_DEFLATED}) read"
    return None
