"""ImageNet straight from its archives: the official tars and Kaggle's zip, read in place.

Tiny archives are built here from the trees of test_imagenet.py (a second writer beside
`pipeline.data.sample_archives`, which the sample tests at the end use), locally and on
a real S3 server (moto). test_archive_index.py tests the tar and zip indexes alone.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import re
import tarfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import run_stage, write_params
from test_imagenet import TRAIN, VAL, image_bytes, make_imagenet, summary, val_name, write_meta_mat
from test_shards import BAD_FILES, digest, quirk_files

from cli.services import S3Server
from pipeline.config import SampleParams, ShardParams
from pipeline.data.catalog import is_image_name
from pipeline.data.ilsvrc_names import (
    DEVKIT,
    DEVKIT_DATA,
    DEVKIT_GROUND_TRUTH,
    DEVKIT_META,
    KAGGLE_DATA,
    KAGGLE_ZIP,
    SYNSET_MAPPING,
    TRAIN_TAR,
    VAL_SOLUTION,
    VAL_TAR,
)
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.records import Catalog, read_record
from pipeline.data.sample import generate_sample
from pipeline.data.shard_writer import write_shards
from pipeline.data.shards import ShardMeta

Edit = Callable[[tarfile.TarFile], None] | None
SIZE, SHARD = 64, 3
NAMES = {"n01000001": "goldfish", "n02000002": "tench", "n03000003": "great white shark"}


# --- builders ---------------------------------------------------------------------------


def add(
    tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(members: list[tuple[str, bytes]], edit: Edit = None, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            add(tar, name, data)
        if edit:
            edit(tar)
    return buf.getvalue()


def make_source(root: Path) -> Path:
    """The tree of test_shards (quirk files, planted bad files) with devkit val labels."""
    make_imagenet(root, "devkit")
    for name, data in quirk_files().items():
        (root / "train" / "n02000002" / name).write_bytes(data)
    for name, (data, _) in BAD_FILES.items():
        (root / "train" / "n01000001" / name).write_bytes(data)
    (root / SYNSET_MAPPING).write_text("".join(f"{w} {n}\n" for w, n in NAMES.items()))
    return root


def images(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if is_image_name(p.name)]


def pack_official(tree: Path, out: Path, outer: Edit = None, inner: Edit = None, val: Edit = None) -> Path:
    """The official archives of a tree with devkit labels; the edits add members last
    (`inner` to the first class's tar)."""
    out.mkdir(parents=True)
    wnids = sorted(p.name for p in (tree / "train").iterdir())
    classes = [
        (f"{w}.tar", tar_bytes(images(tree / "train" / w), inner if i == 0 else None))
        for i, w in enumerate(wnids)
    ]
    (out / TRAIN_TAR).write_bytes(tar_bytes(classes, outer))
    (out / VAL_TAR).write_bytes(tar_bytes(images(tree / "val"), val))
    meta = io.BytesIO()
    write_meta_mat(meta, NAMES)
    truth = (tree / DEVKIT_GROUND_TRUTH).read_bytes()
    devkit = [
        (f"{DEVKIT_DATA}/{DEVKIT_META}", meta.getvalue()),
        (f"{DEVKIT_DATA}/{DEVKIT_GROUND_TRUTH}", truth),
    ]
    (out / DEVKIT).write_bytes(gzip.compress(tar_bytes(devkit)))
    return out


def val_solution() -> bytes:
    rows = [f"{val_name(i)[:-5]},{wnid} 1 2 30 40\n" for i, wnid in enumerate(VAL)]
    return ("ImageId,PredictionString\n" + "".join(reversed(rows))).encode()


def pack_kaggle(
    tree: Path,
    path: Path,
    edit: Callable[[zipfile.ZipFile], None] | None = None,
    root_files: dict | None = None,
) -> Path:
    """Kaggle's zip of a tree, deflated, with folder entries and parts that are not inputs;
    `root_files` ({name: bytes}) replace the LOC_ files' contents, `edit` adds entries last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mapping = "".join(f"{w} {n}\n" for w, n in NAMES.items()).encode()
    root_files = {VAL_SOLUTION: val_solution(), SYNSET_MAPPING: mapping} | (root_files or {})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in root_files.items():
            zf.writestr(name, data)
        zf.writestr("LOC_train_solution.csv", "ImageId,PredictionString\n")
        zf.writestr("ILSVRC/Annotations/CLS-LOC/val/ILSVRC2012_val_00000001.xml", "<annotation/>")
        zf.writestr(f"{KAGGLE_DATA}/test/ILSVRC2012_test_00000001.JPEG", image_bytes(5))
        zf.mkdir(f"{KAGGLE_DATA}/train")
        for folder in sorted((tree / "train").iterdir()):
            zf.mkdir(f"{KAGGLE_DATA}/train/{folder.name}")
            for name, data in images(folder):
                zf.writestr(f"{KAGGLE_DATA}/train/{folder.name}/{name}", data)
        for name, data in images(tree / "val"):
            zf.writestr(f"{KAGGLE_DATA}/val/{name}", data)
        if edit:
            edit(zf)
    return path


def shard(catalog: Catalog, out: Path, **kw: object) -> dict:
    settings = ShardParams(**({"size": SIZE, "shard_size": SHARD, "max_bad_fraction": 0.5} | kw))
    return write_shards(
        catalog.records, out, classes=catalog.classes, names=catalog.names, settings=settings,
        quarantined=catalog.quarantine, progress=False,
    )  # fmt: skip


def shard_files(out: Path) -> dict[str, str]:
    return {k: v for k, v in digest(out).items() if k.startswith(("parquet/", "webdataset/"))}


def meta_without_root(out: Path) -> dict:
    return {k: v for k, v in dataclasses.asdict(ShardMeta.read(str(out))).items() if k != "root"}


def reasons(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "quarantine.csv") as f:
        return sorted((r["split"], r["path"], r["reason"]) for r in csv.DictReader(f))


# --- the same images give the same shards -----------------------------------------------


def test_archives_give_byte_identical_shards(ray_local: None, tmp_path: Path) -> None:
    tree = make_source(tmp_path / "tree")
    official = pack_official(tree, tmp_path / "official")
    kaggle = pack_kaggle(tree, tmp_path / "kaggle" / KAGGLE_ZIP)
    roots = {"tree": tree, "official": official, "kaggle": kaggle.parent, "zip": kaggle}
    catalogs = {name: ingest_imagenet(str(root)) for name, root in roots.items()}
    for name, catalog in catalogs.items():
        assert summary(catalog.records) == summary(catalogs["tree"].records), name
        assert catalog.names == list(NAMES.values()) and catalog.quarantine == [], name
        assert [read_record(r) for r in catalog.records] == [read_record(r) for r in catalogs["tree"].records]
    metrics = {
        name: shard(catalogs[name], tmp_path / f"out-{name}") for name in ("tree", "official", "kaggle")
    }
    expected = shard_files(tmp_path / "out-tree")
    assert len(expected) == 2 * (-(-metrics["tree"]["inputs"]["train"] // SHARD) + 2)
    for name in ("official", "kaggle"):
        out = tmp_path / f"out-{name}"
        assert shard_files(out) == expected, name
        assert meta_without_root(out) == meta_without_root(tmp_path / "out-tree")
        assert {k: metrics[name][k] for k in ("inputs", "sharded", "quarantined")} == {
            k: metrics["tree"][k] for k in ("inputs", "sharded", "quarantined")
        }
        # The planted bad files are quarantined by the shard tasks, under archive paths.
        assert [(s, Path(p).name, r) for s, p, r in reasons(out)] == [
            (s, Path(p).name, r) for s, p, r in reasons(tmp_path / "out-tree")
        ]
        assert all(p.startswith(str(out.parent / name)) for _, p, _ in reasons(out))


# --- what cannot be an input is quarantined, never extracted ----------------------------


def _bad_outer(tar: tarfile.TarFile) -> None:
    add(tar, "n04000004.tar", b"\x01" * 3000)  # damaged from its first header: class kept
    add(tar, "README", b"not a class tar")
    add(tar, "n05000005", b"", tarfile.DIRTYPE)


def _bad_inner(tar: tarfile.TarFile) -> None:
    add(tar, "../../escape.JPEG", image_bytes(1))
    add(tar, "n01000001_link.JPEG", kind=tarfile.LNKTYPE, link="n01000001_0.JPEG")
    add(tar, "n01000001_0.JPEG", image_bytes(99))  # a second member of that name replaces the first


def _bad_val(tar: tarfile.TarFile) -> None:
    add(tar, "../escape.JPEG", image_bytes(2))
    add(tar, "/tmp/escape.JPEG", image_bytes(3))
    add(tar, "ILSVRC2012_val_00000009.JPEG", kind=tarfile.SYMTYPE, link="/etc/passwd")
    add(tar, "sub", kind=tarfile.DIRTYPE)
    add(tar, "sub/ILSVRC2012_val_00000010.JPEG", image_bytes(4))
    add(tar, "notes.txt", b"text")
    add(tar, "fifo.JPEG", kind=tarfile.FIFOTYPE)
    add(tar, "\udcff\udcfe.JPEG", image_bytes(5))  # the bytes ff fe: not UTF-8


def test_bad_members_are_quarantined_and_nothing_is_written(ray_local: None, tmp_path: Path) -> None:
    tree = make_imagenet(tmp_path / "tree", "devkit")
    raw = pack_official(tree, tmp_path / "raw", outer=_bad_outer, inner=_bad_inner, val=_bad_val)
    before = {p for p in tmp_path.parent.rglob("*")}
    catalog = ingest_imagenet(str(raw))
    train, val = f"{raw}/{TRAIN_TAR}", f"{raw}/{VAL_TAR}"
    inner = f"{train}/n01000001.tar"
    rows = sorted(catalog.quarantine)
    assert [(s, p) for s, p, _ in rows] == sorted([
        ("train", f"{train}/n04000004.tar"), ("train", f"{train}/README"), ("train", f"{train}/n05000005"),
        ("train", f"{inner}/../../escape.JPEG"), ("train", f"{inner}/n01000001_link.JPEG"),
        ("train", f"{inner}/n01000001_0.JPEG"),
        ("val", f"{val}/../escape.JPEG"), ("val", f"{val}//tmp/escape.JPEG"),
        ("val", f"{val}/ILSVRC2012_val_00000009.JPEG"), ("val", f"{val}/sub"),
        ("val", f"{val}/sub/ILSVRC2012_val_00000010.JPEG"), ("val", f"{val}/notes.txt"),
        ("val", f"{val}/fifo.JPEG"), ("val", f"{val}/\\xff\\xfe.JPEG"),
    ])  # fmt: skip
    why = {p.removeprefix(f"{raw}/"): r for _, p, r in rows}
    assert why[f"{TRAIN_TAR}/n04000004.tar"].startswith("damaged tar:")
    assert why[f"{TRAIN_TAR}/n05000005"] == "not a regular file: directory"
    assert why[f"{TRAIN_TAR}/README"] == "outside the expected layout: expected <wnid>.tar"
    assert why[f"{VAL_TAR}/../escape.JPEG"].startswith("outside the expected layout")
    assert (
        why[f"{VAL_TAR}/ILSVRC2012_val_00000009.JPEG"] == "not a regular file: symbolic link to '/etc/passwd'"
    )
    assert why[f"{VAL_TAR}/fifo.JPEG"] == "not a regular file: FIFO"
    assert why[f"{TRAIN_TAR}/n01000001.tar/n01000001_link.JPEG"].startswith("not a regular file: hard link")
    assert why[f"{TRAIN_TAR}/n01000001.tar/n01000001_0.JPEG"].startswith("duplicate name: the member at byte")
    # The class of the damaged tar keeps its index; the later duplicate is the one read.
    assert catalog.classes == ["n01000001", "n02000002", "n03000003", "n04000004"]
    kept = next(r for r in catalog.records if r.key == "n01000001_0")
    assert read_record(kept) == image_bytes(99)
    metrics = shard(catalog, tmp_path / "out", max_bad_fraction=0.9)
    assert metrics["quarantined"] == {"train": 6, "val": 8}
    assert metrics["inputs"] == {"train": 6 + 7, "val": 8 + 4}
    for split in ("train", "val"):
        assert metrics["inputs"][split] == metrics["sharded"][split] + metrics["quarantined"][split]
    assert reasons(tmp_path / "out") == rows
    # Nothing was extracted: the only new files are the shard stage's output.
    after = {p for p in tmp_path.parent.rglob("*")}
    assert all(p.is_relative_to(tmp_path / "out") for p in after - before)
    assert not [p for p in after if p.name == "escape.JPEG"] and not Path("/tmp/escape.JPEG").exists()


def test_kaggle_zip_entries_outside_the_layout_are_quarantined(tmp_path: Path) -> None:
    tree = make_imagenet(tmp_path / "tree", "devkit")

    def bad(zf: zipfile.ZipFile) -> None:
        zf.writestr(f"{KAGGLE_DATA}/val/../../../escape.JPEG", image_bytes(1))
        zf.writestr("stray.JPEG", image_bytes(2))
        zf.writestr(f"{KAGGLE_DATA}/train/n01000001/deeper/x.JPEG", image_bytes(3))
        link = zipfile.ZipInfo(f"{KAGGLE_DATA}/val/ILSVRC2012_val_00000009.JPEG")
        link.create_system, link.external_attr = 3, 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr(f"{KAGGLE_DATA}/val/{val_name(0)}", image_bytes(77))  # replaces the first
        zf.writestr(f"{KAGGLE_DATA}/val/ILSVRC2012_val_00000011.JPEG", image_bytes(6), zipfile.ZIP_BZIP2)

    with pytest.warns(UserWarning, match="Duplicate name"):
        path = pack_kaggle(tree, tmp_path / KAGGLE_ZIP, bad)
    catalog = ingest_imagenet(str(path))
    why = {p.removeprefix(f"{path}/"): (s, r) for s, p, r in catalog.quarantine}
    assert set(why) == {
        f"{KAGGLE_DATA}/val/../../../escape.JPEG", "stray.JPEG",
        f"{KAGGLE_DATA}/train/n01000001/deeper/x.JPEG",
        f"{KAGGLE_DATA}/val/ILSVRC2012_val_00000009.JPEG", f"{KAGGLE_DATA}/val/{val_name(0)}",
        f"{KAGGLE_DATA}/val/ILSVRC2012_val_00000011.JPEG",
    }  # fmt: skip
    assert why[f"{KAGGLE_DATA}/val/../../../escape.JPEG"] == (
        "val",
        f"outside the expected layout: expected {KAGGLE_DATA}/val/<image>",
    )
    assert why["stray.JPEG"][0] == "train"
    assert why[f"{KAGGLE_DATA}/val/ILSVRC2012_val_00000009.JPEG"] == (
        "val",
        "not a regular file: symbolic link",
    )
    assert why[f"{KAGGLE_DATA}/val/{val_name(0)}"][1].startswith("duplicate name: the entry at byte")
    assert why[f"{KAGGLE_DATA}/val/ILSVRC2012_val_00000011.JPEG"][1].startswith("compression method 12:")
    first_val = next(r for r in catalog.records if r.split == "val")
    assert read_record(first_val) == image_bytes(77)
    assert sum(r.split == "train" for r in catalog.records) == sum(TRAIN.values())
    assert not list(tmp_path.parent.rglob("escape.JPEG"))


# --- layout detection and label files ---------------------------------------------------


def test_no_layout_names_the_path_and_the_three_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        ingest_imagenet(str(tmp_path))
    for part in (str(tmp_path), "a tree", TRAIN_TAR, VAL_TAR, DEVKIT, KAGGLE_ZIP):
        assert part in str(err.value)
    (tmp_path / TRAIN_TAR).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"holds {TRAIN_TAR} but not {VAL_TAR}, {DEVKIT}"):
        ingest_imagenet(str(tmp_path))
    (tmp_path / TRAIN_TAR).unlink()
    make_imagenet(tmp_path, "kaggle")
    pack_kaggle(tmp_path, tmp_path / KAGGLE_ZIP)
    with pytest.raises(ValueError, match=r"holds more than one layout \(tree, kaggle_zip\)"):
        ingest_imagenet(str(tmp_path))


LABEL_ERRORS = [  # (file, bad content, line, message)
    (DEVKIT_GROUND_TRUTH, b"1\n2\nthree\n1\n", 3, "expected an ILSVRC2012_ID"),
    (VAL_SOLUTION, val_solution() + b"ILSVRC2012_val_00000009,\n", 6,
     "expected an ImageId and a PredictionString"),
    (VAL_SOLUTION, val_solution() + b"ILSVRC2012_val_00000001,n01000001 1 2 3 4\n", 6,
     "ImageId ILSVRC2012_val_00000001 already on line 5"),
    (SYNSET_MAPPING, b"n01000001 goldfish\nn02000002 tench\nn01000001 carp\n", 3,
     "wnid n01000001 already listed on line 1"),
]  # fmt: skip


@pytest.mark.parametrize(("layout", "case"), [(lay, c) for c in LABEL_ERRORS for lay in ("tree", "archive")])
def test_label_file_errors_name_file_and_line(tmp_path: Path, layout: str, case: tuple) -> None:
    file, content, line, message = case
    tree = make_imagenet(tmp_path / "tree", "devkit")
    (tree / file).write_bytes(content)  # in a tree, LOC_val_solution.csv wins over the devkit
    if layout == "tree":
        root, where = tree, str(tree / file)
    elif file == DEVKIT_GROUND_TRUTH:
        root = pack_official(tree, tmp_path / "raw")
        where = f"{root / DEVKIT}/{DEVKIT_DATA}/{file}"
    else:
        root = pack_kaggle(tree, tmp_path / KAGGLE_ZIP, root_files={file: content})
        where = f"{root}/{file}"
    with pytest.raises(ValueError, match=f"^{re.escape(where)}:{line}: {re.escape(message)}"):
        ingest_imagenet(str(root))


# --- object storage ---------------------------------------------------------------------


def test_archives_on_s3(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    tree = make_imagenet(tmp_path / "tree", "devkit")
    pack_official(tree, tmp_path / "raw")
    pack_kaggle(tree, tmp_path / "raw-zip" / KAGGLE_ZIP)
    bucket = f"archives-{uuid.uuid4().hex[:8]}"  # a bucket of its own: a fresh cached client
    fs = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint, region=s3_server.region, allow_bucket_creation=True
    )
    fs.create_dir(bucket)
    for folder in ("raw", "raw-zip"):
        local_fs = pafs.LocalFileSystem()
        pafs.copy_files(str(tmp_path / folder), f"{bucket}/{folder}", local_fs, destination_filesystem=fs)
    local = ingest_imagenet(str(tmp_path / "raw"))
    for folder in ("raw", "raw-zip"):
        remote = ingest_imagenet(f"s3://{bucket}/{folder}")
        assert summary(remote.records) == summary(local.records) and remote.quarantine == []
        assert all(r.path.startswith(f"s3://{bucket}/{folder}/") for r in remote.records)
        assert [read_record(r) for r in remote.records] == [read_record(r) for r in local.records]


# --- the sample stage writes archives; the shard stage reads them -----------------------


def test_sample_archives_are_deterministic_and_ingest_like_the_tree(tmp_path: Path) -> None:
    params = SampleParams(num_classes=3, train_per_class=4, val_per_class=2)
    roots = {}
    for layout in ("tree", "archives", "kaggle_zip"):
        summary_ = generate_sample(tmp_path / layout, dataclasses.replace(params, layout=layout))
        roots[layout] = Path(summary_["root"])
        assert sorted(p.name for p in roots[layout].iterdir()) == sorted(summary_["files"])
    assert sorted(summary_["files"]) == [KAGGLE_ZIP]
    assert sorted(p.name for p in roots["archives"].iterdir()) == sorted([TRAIN_TAR, VAL_TAR, DEVKIT])
    generate_sample(tmp_path / "again", dataclasses.replace(params, layout="archives"))
    assert digest(tmp_path / "again") == digest(roots["archives"])
    with tarfile.open(roots["archives"] / TRAIN_TAR) as tar:
        assert all(m.mtime == 1338508800 and m.uid == 0 and not m.uname for m in tar)
    catalogs = {layout: ingest_imagenet(str(root)) for layout, root in roots.items()}
    for layout in ("archives", "kaggle_zip"):
        assert summary(catalogs[layout].records) == summary(catalogs["tree"].records)
        assert catalogs[layout].names == catalogs["tree"].names
        assert [read_record(r) for r in catalogs[layout].records] == [
            read_record(r) for r in catalogs["tree"].records
        ]


def test_shard_stage_reads_the_sample_stages_archives(tiny_inputs: Path, tmp_path: Path) -> None:
    write_params(tmp_path, {"sample": {"layout": "archives"}})
    run_stage(tmp_path, "sample")
    assert sorted(p.name for p in (tmp_path / "data" / "sample").iterdir()) == sorted(
        [TRAIN_TAR, VAL_TAR, DEVKIT]
    )
    run_stage(tmp_path, "shard")
    out, expected = tmp_path / "data" / "shards", tiny_inputs / "data" / "shards"
    assert shard_files(out) == shard_files(expected)  # byte-identical to the tree's shards
    assert meta_without_root(out) == meta_without_root(expected)
    metrics = json.loads((tmp_path / "metrics" / "shard.json").read_text())
    assert metrics["inputs"] == json.loads((tiny_inputs / "metrics" / "shard.json").read_text())["inputs"]
    assert (out / "quarantine.csv").read_text() == "split,path,reason\n"
