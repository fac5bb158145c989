"""The shard format: files, columns, the manifest (`meta.json`), and reading shards back.

Layout of a shard output (relative paths are what meta.json lists)::

    meta.json                               written last; its presence = complete output
    quarantine.csv                          split,path,reason (header even when empty)
    parquet/{train,val}/part-00000.parquet  key, label, wnid, jpeg, height, width,
                                            src_height, src_width
    webdataset/{train,val}/shard-00000.tar  <key>.jpg, <key>.cls (label, ascii) per sample

Both formats hold the same samples in the same shards and order (see
`pipeline.data.shard_writer`). One reader serves both: `read_shards`, a Ray Dataset
with one read task and one block per shard file, in meta.json's order, so an epoch's
first rows wait for one shard, not for all of them.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections.abc import Iterator
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


def shard_path(fmt: str, split: str, index: int) -> str:
    """Relative path of shard `index` of `split` in format `fmt`."""
    name = f"part-{index:05d}.parquet" if fmt == "parquet" else f"shard-{index:05d}.tar"
    return f"{fmt}/{split}/{name}"


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
        shards: {format: {split: [relative shard paths, in order]}}.
        sizes: {split: [images in each shard, in order]} (both formats hold the same).
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
                if len(raw["sizes"].get(split, ())) != len(rels):
                    raise ValueError(f"{uri}: sizes.{split} does not count the {len(rels)} {fmt} shards")
        # Absolute: the shard paths `files` gives reach tasks that run in their own cwd.
        return cls(root=absolute(root), **raw)

    def file_sizes(self, split: str, fmt: str) -> dict[str, int]:
        """Images in each shard file of `split` in `fmt`, by path (as `files` gives them)."""
        return dict(zip(self.files(split, fmt), self.sizes[split], strict=True))

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
        return [join(self.root, rel) for rel in rels]


READ_COLUMNS = ("key", "label", "jpeg")
READ_SCHEMA = pa.schema([SCHEMA.field(c) for c in READ_COLUMNS])


def read_shard_table(uri: str, fmt: str) -> pa.Table:
    """One shard file as a table of key (string), label (int64), jpeg (binary), in stored order."""
    fs, path = resolve(uri)
    if fmt == "parquet":
        return pq.read_table(path, filesystem=fs, columns=list(READ_COLUMNS))
    rows: dict[str, list] = {c: [] for c in READ_COLUMNS}
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            payload = tar.extractfile(member).read()
            if ext == "jpg":
                rows["key"].append(key)
                rows["jpeg"].append(payload)
            else:  # .cls follows its .jpg
                rows["label"].append(int(payload))
    return pa.table(rows, schema=READ_SCHEMA)


def iter_shard(uri: str, fmt: str) -> Iterator[tuple[str, int, bytes]]:
    """Yields (key, label, jpeg bytes) of one shard file, in stored order, without Ray."""
    table = read_shard_table(uri, fmt)
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
    return read_shard_files(ShardMeta.read(shards_dir).files(split, fmt), fmt, decode=decode)


def read_shard_files(files: list[str], fmt: str, *, decode: bool = False) -> ray.data.Dataset:
    """Reads shard files as a Ray Dataset, one read task and one block per file, in order.

    One block per file lets rows stream in shard by shard (Ray Data's read_parquet may
    plan many small files as one read task, whose rows all arrive at once).

    Returns:
        Columns key (string), label (int64) and either image ((H, W, 3) uint8 tensor)
        when `decode`, or jpeg (binary).
    """
    ds = ray.data.from_items([{"uri": uri} for uri in files], override_num_blocks=len(files))
    ds = ds.map_batches(_read_files, fn_kwargs={"fmt": fmt}, batch_size=1, batch_format="pyarrow")
    return ds.map_batches(_decode_batch, batch_format="numpy") if decode else ds


def _read_files(batch: pa.Table, fmt: str) -> pa.Table:
    """Ray Data map: a batch of shard URIs -> their rows."""
    return pa.concat_tables([read_shard_table(uri, fmt) for uri in batch.column("uri").to_pylist()])


def _decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """key, label, jpeg -> key, label, image ((N, H, W, 3) uint8)."""
    return {
        "key": batch["key"],
        "label": batch["label"],
        "image": np.stack([decode_jpeg(b) for b in batch["jpeg"]]),
    }
