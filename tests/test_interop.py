"""Our shards in other people's tools: the `webdataset` library reads our tars, pandas and
pyarrow read our Parquet parts, and our tars are the bytes Python's tarfile writes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from test_imagenet import make_imagenet

from pipeline.config import ShardParams
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.preprocess import Processed, preprocess_image
from pipeline.data.records import Record
from pipeline.data.shard_encoding import encode
from pipeline.data.shard_writer import write_shards
from pipeline.data.shards import SCHEMA, ShardMeta

SIZE = 48
SHARD = 3


@pytest.fixture(scope="module")
def shards(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """(shard dir, {split: {key: expected row}}) of the tiny tree sharded in both formats.

    The expected rows come from the sources themselves: label and wnid from the catalog,
    the stored JPEG from our per-image function, so nothing here trusts our readers.
    """
    base = tmp_path_factory.mktemp("interop")
    catalog = ingest_imagenet(str(make_imagenet(base / "src", "folders")))
    settings = ShardParams(size=SIZE, format="both", shard_size=SHARD)
    write_shards(catalog.records, base / "out", classes=catalog.classes, settings=settings, progress=False)
    expected: dict[str, dict] = {"train": {}, "val": {}}
    for rec in catalog.records:
        out = preprocess_image(Path(rec.path).read_bytes(), size=SIZE)
        assert isinstance(out, Processed)
        expected[rec.split][rec.key] = {
            "key": rec.key, "label": rec.label, "wnid": rec.wnid, "jpeg": out.jpeg, "height": SIZE,
            "width": SIZE, "src_height": out.src_height, "src_width": out.src_width,
        }  # fmt: skip
    return base / "out", expected


@pytest.mark.parametrize("split", ["train", "val"])
def test_webdataset_library_reads_our_tars(shards: tuple[Path, dict], split: str) -> None:
    out, expected = shards
    urls = ShardMeta.read(str(out)).files(split, "webdataset")
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in samples) == sorted(expected[split])
    for s in samples:
        want = expected[split][s["__key__"]]
        assert set(s) == {"__key__", "__url__", "__local_path__", "jpg", "cls"}
        assert s["jpg"] == want["jpeg"]
        assert int(s["cls"]) == want["label"] and s["cls"] == str(want["label"]).encode()
    decoded = next(iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")))
    assert decoded["jpg"].shape == (SIZE, SIZE, 3)
    assert decoded["cls"] == expected[split][decoded["__key__"]]["label"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_pandas_reads_our_parquet(shards: tuple[Path, dict], split: str) -> None:
    out, expected = shards
    parts = [pd.read_parquet(f) for f in ShardMeta.read(str(out)).files(split, "parquet")]
    frame = pd.concat(parts, ignore_index=True)
    assert list(frame.columns) == SCHEMA.names == [
        "key", "label", "wnid", "jpeg", "height", "width", "src_height", "src_width"
    ]  # fmt: skip
    assert str(frame["label"].dtype) == "int64" and str(frame["height"].dtype) == "int32"
    assert sorted(frame["key"]) == sorted(expected[split])
    assert frame.to_dict("records") == [expected[split][k] for k in frame["key"]]
    # pyarrow's dataset reader takes the split's folder as one table, in the same rows.
    table = pq.read_table(out / "parquet" / split)
    assert table.schema.equals(SCHEMA) and table.num_rows == len(frame)
    assert sorted(table.column("key").to_pylist()) == sorted(frame["key"])


def test_our_tars_are_what_tarfile_writes(shards: tuple[Path, dict]) -> None:
    # Our writer builds the tar without tarfile's per-member file objects; the bytes must
    # stay exactly those of tarfile.open(mode="w") adding the same members.
    out, _ = shards
    tars = [p for split in ("train", "val") for p in ShardMeta.read(str(out)).files(split, "webdataset")]
    assert len(tars) >= 3
    for path in tars:
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]
        assert Path(path).read_bytes() == _tarfile_bytes(members)


def test_our_tar_headers_are_tarfiles_for_long_and_non_ascii_keys() -> None:
    # Short ASCII names get a header built by hand; longer or non-ASCII ones need PAX
    # extended headers, which must come out as tarfile writes them too.
    keys = ["n01440764_10026", "k" * 95, "k" * 96, "k" * 200, "caf\u00e9_1", "\u732b_2"]
    payload = b"\xff\xd8" + bytes(range(256)) * 3
    kept = [
        (Record("train", f"/x/{k}.JPEG", i, "n0", k), Processed(payload, 4, 4, 4, 4))
        for i, k in enumerate(keys)
    ]
    [ours] = encode("webdataset", kept)
    members = [
        (f"{k}.{ext}", data)
        for i, k in enumerate(keys)
        for ext, data in (("jpg", payload), ("cls", str(i).encode()))
    ]
    assert bytes(ours) == _tarfile_bytes(members)


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """What tarfile.open(mode="w") writes for these (name, payload) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as ref:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            ref.addfile(info, io.BytesIO(payload))
    return buf.getvalue()
