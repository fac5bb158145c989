"""The shard format: files, columns, the manifest (`meta.json`), and reading shards back.

Layout of a shard output (relative paths are what meta.json lists)::

    meta.json                               written last; its presence = complete output
    quarantine.csv                          split,path,reason (header even when empty)
    parquet/{train,val}/part-00000.parquet  key, label, wnid, jpeg, height, width,
                                            src_height, src_width
    webdataset/{train,val}/shard-00000.tar  <key>.jpg, <key>.cls (label, ascii) per sample

With `data.shard_store` set, the shard files live there instead (an object store such
as s3://bucket/prefix, or another folder), named after their content
(`parquet/train/part-00000-<16 hex of its SHA-256>.parquet`), and meta.json lists their
full URIs; the output folder then holds only meta.json and quarantine.csv.

Both formats hold the same samples in the same shards and order (see
`pipeline.data.shard_writer`). One reader serves both: `read_shards`, a Ray Dataset
with one read task and one block per shard file, in meta.json's order, so an epoch's
first rows wait for one shard, not for all of them. Every reader checks each file's
SHA-256 against meta.json before using a byte of it (`CorruptShardError`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import jsonfile
from pipeline.data.preprocess import decode_jpeg
from pipeline.storage import absolute, join, read_bytes, resolve

FORMATS = ("parquet", "webdataset")
META = "meta.json"
QUARANTINE = "quarantine.csv"
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int64()),
        ("wnid", pa.string()),
        ("jpeg", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("src_height", pa.int32()),
        ("src_width", pa.int32()),
    ]
)


def shard_path(fmt: str, split: str, index: int, sha256: str = "") -> str:
    """Relative path of shard `index` of `split` in format `fmt`; in a shard store, the
    first 16 hex digits of the file's SHA-256 end its name (content-addressed)."""
    tag = f"-{sha256[:16]}" if sha256 else ""
    name = f"part-{index:05d}{tag}.parquet" if fmt == "parquet" else f"shard-{index:05d}{tag}.tar"
    return f"{fmt}/{split}/{name}"


class CorruptShardError(ValueError):
    """A shard file is missing, or its bytes are not the ones its meta.json lists."""


@dataclass(frozen=True)
class ShardFile:
    """One shard file as meta.json lists it."""

    uri: str  # absolute local path or URI
    images: int
    nbytes: int
    sha256: str  # hex digest of the whole file


@dataclass(frozen=True)
class ShardMeta:
    """A complete shard output's manifest (meta.json), written last by the shard writer.

    Attributes:
        root: Where the output lives (absolute local path or URI); not stored in the file.
        classes: Wnids (CIFAR: class names) in label order.
        names: Human-readable class names in label order.
        counts, inputs, quarantined: Images per split: sharded, listed, quarantined.
        size, quality: Side and JPEG quality of the stored images.
        format: "parquet", "webdataset" or "both".
        shard_size, seed: Inputs per shard and the train shuffle's seed.
        shards: {format: {split: [shard paths, in order]}}: relative to `root`, or full
            URIs of files in a shard store.
        sizes: {split: [images in each shard, in order]} (both formats hold the same).
        nbytes, sha256: {format: {split: [per shard file, in order]}}: its length in bytes
            and the hex SHA-256 of its content.
    """

    root: str
    classes: list[str]
    names: list[str]
    counts: dict[str, int]
    inputs: dict[str, int]
    quarantined: dict[str, int]
    size: int
    quality: int
    format: str
    shard_size: int
    seed: int
    shards: dict[str, dict[str, list[str]]]
    sizes: dict[str, list[int]]
    nbytes: dict[str, dict[str, list[int]]]
    sha256: dict[str, dict[str, list[str]]]

    def to_json(self) -> bytes:
        """meta.json's bytes (everything but `root`)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "root"}
        return json.dumps(fields, indent=1).encode()

    @classmethod
    def read(cls, root: str) -> ShardMeta:
        """Reads `root/meta.json` (local path or URI).

        Raises:
            FileNotFoundError: No meta.json, i.e. not a complete shard output.
            ValueError: meta.json is not the writer's JSON (names the file and key; the
                line and column of a syntax error).
        """
        uri = join(root, META)
        try:
            raw = jsonfile.parse(read_bytes(uri), uri)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{uri}: shard metadata missing; run the shard stage first") from e
        jsonfile.check_fields(cls, {**raw, "root": root}, uri)
        if len(raw["names"]) != len(raw["classes"]):
            raise ValueError(f"{uri}: {len(raw['names'])} names for {len(raw['classes'])} classes")
        if raw["format"] not in (*FORMATS, "both") or not set(raw["shards"]) <= set(FORMATS):
            formats = f"format={raw['format']!r}, shards in {sorted(raw['shards'])}"
            raise ValueError(f"{uri}: {formats}: expected formats from {FORMATS}")
        for fmt, splits in raw["shards"].items():
            for split, rels in splits.items():
                for key in ("nbytes", "sha256"):
                    if len(raw[key].get(fmt, {}).get(split, ())) != len(rels):
                        raise ValueError(f"{uri}: {key}.{fmt}.{split} does not list its {len(rels)} shards")
                if len(raw["sizes"].get(split, ())) != len(rels):
                    raise ValueError(f"{uri}: sizes.{split} does not count the {len(rels)} {fmt} shards")
        # Absolute: the shard paths `files` gives reach tasks that run in their own cwd.
        return cls(root=absolute(root), **raw)

    def file_sizes(self, split: str, fmt: str) -> dict[str, int]:
        """Images in each shard file of `split` in `fmt`, by path (as `files` gives them)."""
        return dict(zip(self.files(split, fmt), self.sizes[split], strict=True))

    def digests(self, split: str, fmt: str) -> dict[str, str]:
        """The SHA-256 of each shard file of `split` in `fmt`, by path (as `files` gives them)."""
        return dict(zip(self.files(split, fmt), self.sha256[fmt][split], strict=True))

    def shard_files(self, fmt: str) -> list[ShardFile]:
        """Every shard file in `fmt`, train then val, with what meta.json says of it."""
        return [
            ShardFile(uri, images, nbytes, digest)
            for split in self.shards.get(fmt, {})
            for uri, images, nbytes, digest in zip(
                self.files(split, fmt), self.sizes[split], self.nbytes[fmt][split], self.sha256[fmt][split],
                strict=True,
            )
        ]  # fmt: skip

    def files(self, split: str, fmt: str) -> list[str]:
        """Paths (absolute, or URIs) of the shards of `split` in `fmt`, in order.

        Raises:
            ValueError: `fmt` was not written, or `split` has no shards.
        """
        if fmt not in self.shards:
            raise ValueError(f"{self.root} holds no {fmt} shards (format {self.format!r})")
        rels = self.shards[fmt].get(split, [])
        if not rels:
            raise ValueError(f"{self.root} holds no {split} shards")
        return [rel if "://" in rel or rel.startswith("/") else join(self.root, rel) for rel in rels]


READ_COLUMNS = ("key", "label", "jpeg")
READ_SCHEMA = pa.schema([SCHEMA.field(c) for c in READ_COLUMNS])


def checked_bytes(uri: str, sha256: str | None) -> bytes:
    """A shard file's bytes, after checking them against their meta.json digest (if given).

    Raises:
        CorruptShardError: The file is missing or its SHA-256 differs, naming the file.
    """
    try:
        data = read_bytes(uri)
    except FileNotFoundError as e:
        raise CorruptShardError(f"{uri}: shard file missing; {_RERUN}") from e
    if sha256 is not None and (problem := _content_problem(uri, data, sha256)):
        raise CorruptShardError(f"{problem}; {_RERUN}")
    return data


def _content_problem(uri: str, data: bytes, sha256: str) -> str | None:
    """What is wrong with a shard file's bytes, or None when they have their SHA-256."""
    got = hashlib.sha256(data).hexdigest()
    if got == sha256:
        return None
    return (
        f"{uri}: SHA-256 {got[:16]}... of its {len(data)} bytes differs from meta.json's "
        f"{sha256[:16]}...: the file changed after the shard stage wrote it"
    )


_RERUN = "rerun the shard stage (`dvc repro -f shard`); `python -m cli.verify` checks every shard"


def check_shard_files(
    meta: ShardMeta, fmt: str | None = None, *, full: bool = True, threads: int = 8
) -> list[str]:
    """Checks every shard file meta.json lists.

    Args:
        meta: The manifest.
        fmt: Only this format's files (default: every format written).
        full: Read each file and compare its SHA-256; False only compares lengths (one
            metadata request per file: cheap enough before every training run).
        threads: Files checked at once (hashing and object-store reads release the GIL).

    Returns:
        One message per bad file (missing, wrong length, wrong content); empty when all
        are as written.
    """

    def problem(f: ShardFile) -> str | None:
        fs, path = resolve(f.uri)
        info = fs.get_file_info(path)
        if info.size is None or info.type.name != "File":
            return f"{f.uri}: shard file missing"
        if info.size != f.nbytes:
            return f"{f.uri}: {info.size} bytes, meta.json lists {f.nbytes} (cut short or replaced)"
        return _content_problem(f.uri, read_bytes(f.uri), f.sha256) if full else None

    files = [f for written in meta.shards if fmt in (None, written) for f in meta.shard_files(written)]
    with ThreadPoolExecutor(threads) as pool:
        return [p for p in pool.map(problem, files) if p is not None]


def read_shard_table(uri: str, fmt: str, sha256: str | None = None) -> pa.Table:
    """One shard file as a table of key (string), label (int64), jpeg (binary), in stored order.

    Args:
        uri: The shard file.
        fmt: "parquet" or "webdataset".
        sha256: Its digest from meta.json: checked before parsing (`checked_bytes`).
    """
    data = checked_bytes(uri, sha256)
    if fmt == "parquet":
        return pq.read_table(pa.BufferReader(data), columns=list(READ_COLUMNS))
    rows: dict[str, list] = {c: [] for c in READ_COLUMNS}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            payload = tar.extractfile(member).read()
            if ext == "jpg":
                rows["key"].append(key)
                rows["jpeg"].append(payload)
            else:  # .cls follows its .jpg
                rows["label"].append(int(payload))
    return pa.table(rows, schema=READ_SCHEMA)


def iter_shard(uri: str, fmt: str, sha256: str | None = None) -> Iterator[tuple[str, int, bytes]]:
    """Yields (key, label, jpeg bytes) of one shard file, in stored order, without Ray."""
    table = read_shard_table(uri, fmt, sha256)
    yield from zip(*(table.column(c).to_pylist() for c in READ_COLUMNS), strict=True)


def read_shards(
    shards_dir: str, split: str, *, fmt: str = "parquet", decode: bool = True
) -> ray.data.Dataset:
    """Reads one split of a shard output as a Ray Dataset (see `read_shard_files`).

    Args:
        shards_dir: The shard writer's output folder (local path or URI).
        split: "train" or "val".
        fmt: "parquet" or "webdataset".
        decode: Decode the JPEGs.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    meta = ShardMeta.read(shards_dir)
    return read_shard_files(meta.files(split, fmt), fmt, decode=decode, digests=meta.digests(split, fmt))


def read_shard_files(
    files: list[str],
    fmt: str,
    *,
    decode: bool = False,
    digests: Mapping[str, str] | None = None,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Reads shard files as a Ray Dataset, one read task and one block per file, in order.

    One block per file lets rows stream in shard by shard (Ray Data's read_parquet may
    plan many small files as one read task, whose rows all arrive at once).

    Args:
        files: Shard file paths or URIs.
        fmt: "parquet" or "webdataset".
        decode: Decode the JPEGs.
        digests: SHA-256 by file (`ShardMeta.digests`): a file whose bytes differ fails
            its read task with `CorruptShardError` naming it, before any of its rows exist.
        num_cpus: CPUs each read task requests from Ray.

    Returns:
        Columns key (string), label (int64) and either image ((H, W, 3) uint8 tensor)
        when `decode`, or jpeg (binary).
    """
    digests = digests or {}
    items = [{"uri": uri, "sha256": digests.get(uri, "")} for uri in files]
    ds = ray.data.from_items(items, override_num_blocks=len(files))
    ds = ds.map_batches(
        _read_files, fn_kwargs={"fmt": fmt}, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus
    )
    return ds.map_batches(_decode_batch, batch_format="numpy") if decode else ds


def _read_files(batch: pa.Table, fmt: str) -> pa.Table:
    """Ray Data map: a batch of shard URIs (and digests, "" for none) -> their rows."""
    pairs = zip(batch.column("uri").to_pylist(), batch.column("sha256").to_pylist(), strict=True)
    return pa.concat_tables([read_shard_table(uri, fmt, digest or None) for uri, digest in pairs])


def _decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """key, label, jpeg -> key, label, image ((N, H, W, 3) uint8)."""
    return {
        "key": batch["key"],
        "label": batch["label"],
        "image": np.stack([decode_jpeg(b) for b in batch["jpeg"]]),
    }
