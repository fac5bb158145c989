"""The archive indexes alone: tar headers (formats, damage) and zip central directories
(zip64), and reading a member by its byte range (a damaged zip entry fails, never
returns wrong bytes)."""

from __future__ import annotations

import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_archives import pack_kaggle, tar_bytes
from test_imagenet import image_bytes, make_imagenet

from pipeline.data.archive_io import LOCAL_FETCH, ArchiveFile, Location, ZipCoding, open_archive, read_member
from pipeline.data.ilsvrc_names import KAGGLE_DATA, KAGGLE_ZIP
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.records import read_record
from pipeline.data.tar_index import TarListing, index_tar
from pipeline.data.zip_index import index_zip


def _archive(path: Path) -> ArchiveFile:
    return ArchiveFile(str(path), path.stat().st_size, path.stat().st_mtime_ns)


def test_damaged_zip_entry_is_unreadable_not_wrong(tmp_path: Path) -> None:
    path = pack_kaggle(make_imagenet(tmp_path / "tree", "devkit"), tmp_path / KAGGLE_ZIP)
    catalog = ingest_imagenet(str(path))
    rec = catalog.records[0]
    raw = bytearray(path.read_bytes())
    data_at = rec.location.offset + 30 + len(f"{KAGGLE_DATA}/train/{rec.wnid}/{Path(rec.path).name}")
    raw[data_at + 100] ^= 0xFF
    path.write_bytes(bytes(raw))  # same size: only the CRC or the deflate stream can tell
    with pytest.raises(OSError, match=r"zip entry at byte \d+: (bad deflate stream|CRC-32 mismatch)"):
        read_record(ingest_imagenet(str(path)).records[0])


def test_archive_records_pickle_whole(tmp_path: Path) -> None:
    """A shard task gets its records pickled (pipeline.data.pickling): every field of a
    Record, its Location and ZipCoding comes back, and the copy reads the same bytes."""
    path = pack_kaggle(make_imagenet(tmp_path / "tree", "devkit"), tmp_path / KAGGLE_ZIP)
    records = ingest_imagenet(str(path)).records
    copies = pickle.loads(pickle.dumps(records, protocol=5))
    assert copies == records and all(c.location.zip is not None for c in copies)
    assert [read_record(c) for c in copies[:3]] == [read_record(r) for r in records[:3]]


def _listing(data: bytes, tmp_path: Path) -> TarListing:
    path = tmp_path / "x.tar"
    path.write_bytes(data)
    return index_tar(open_archive(_archive(path)), 0, len(data), LOCAL_FETCH)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_index_offsets_and_long_names(tmp_path: Path, fmt: int) -> None:
    members = [
        ("a" * 90 + "/" + "b" * 60 + ".JPEG", image_bytes(1)),
        ("short.JPEG", b""),
        ("c.JPEG", b"x" * 513),
    ]
    listing = _listing(tar_bytes(members, fmt=fmt), tmp_path)
    assert listing.damage is None
    assert [(m.name, m.size, m.problem) for m in listing.members] == [(n, len(d), None) for n, d in members]
    data = (tmp_path / "x.tar").read_bytes()
    assert [data[m.offset : m.offset + m.size] for m in listing.members] == [d for _, d in members]


def test_tar_index_reports_damage_and_keeps_what_came_before(tmp_path: Path) -> None:
    whole = tar_bytes([("a.JPEG", b"a" * 600), ("b.JPEG", b"b" * 2000), ("c.JPEG", b"c" * 10)])
    truncated = _listing(whole[: 1536 + 512 + 700], tmp_path)  # inside b's data
    assert [(m.name, m.problem) for m in truncated.members] == [
        ("a.JPEG", None), ("b.JPEG", "truncated: its 2000 bytes run past the end of the tar")
    ]  # fmt: skip
    assert truncated.damage.startswith("damaged tar: unexpected end of data")
    no_end = _listing(whole[: 1536 + 512 + 2048], tmp_path)  # cut between members
    assert [m.problem for m in no_end.members] == [None, None]
    assert no_end.damage == "damaged tar: ends at byte 4096 without its end-of-archive marker"
    garbage = bytearray(whole)
    garbage[1536 + 512 + 2048 : 1536 + 512 + 2048 + 512] = b"\x07" * 512  # c's header
    listing = _listing(bytes(garbage), tmp_path)
    assert [m.name for m in listing.members] == ["a.JPEG", "b.JPEG"]
    assert listing.damage == "damaged tar: unreadable header at byte 4096"


def test_zip64_central_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A zip64 archive (as Kaggle's 155 GB one): zipfile writes zip64 records and extra
    # fields past its ZIP64_LIMIT, lowered here so a small file needs them.
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1000)
    path = tmp_path / "z.zip"
    members = {f"m{i}.JPEG": image_bytes(i, (60, 40)) for i in range(5)}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    monkeypatch.undo()
    assert b"PK\x06\x06" in path.read_bytes()[-200:]  # the zip64 end record is there
    entries = index_zip(open_archive(_archive(path)), str(path))
    assert [(e.name, e.file_size, e.problem) for e in entries] == [
        (n, len(d), None) for n, d in members.items()
    ]
    assert entries[-1].header_offset > 1000
    archive = _archive(path)
    codings = [ZipCoding(e.method, e.crc32, e.file_size) for e in entries]
    sizes = [(e.header_offset, e.compressed_size) for e in entries]
    locations = [Location(archive, *where, c) for where, c in zip(sizes, codings, strict=True)]
    assert [read_member(loc) for loc in locations] == list(members.values())
