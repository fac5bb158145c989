"""The generated sample as the archives people download: the official tars or Kaggle's zip.

Built from the tree `pipeline.data.sample` writes, in the real layouts and member names:

- `archives`: ILSVRC2012_img_train.tar (one `<wnid>.tar` per class, in wnid order, each
  holding that class's images), ILSVRC2012_img_val.tar (the val images, flat) and
  ILSVRC2012_devkit_t12.tar.gz (`ILSVRC2012_devkit_t12/data/meta.mat` and
  `.../ILSVRC2012_validation_ground_truth.txt`). As in the real devkit, the
  ILSVRC2012_IDs do not follow the wnid order (a seeded permutation), and meta.mat
  lists a non-leaf synset too.
- `kaggle_zip`: imagenet-object-localization-challenge.zip with LOC_synset_mapping.txt,
  LOC_val_solution.csv, folder entries and `ILSVRC/Data/CLS-LOC/{train/<wnid>/,val/}`,
  deflated.

The bytes are a pure function of the tree and the seed: tar headers carry a fixed mtime,
uid/gid 0 and no user names, the gzip header no name or time, zip entries a fixed date,
meta.mat a fixed header text instead of its creation time.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import scipy.io

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
from pipeline.data.labels import parse_synset_mapping, parse_val_solution

LAYOUTS = ("tree", "archives", "kaggle_zip")
_MTIME = 1338508800  # 2012-06-01 UTC, for every tar member
_ZIP_DATE = (2012, 6, 1, 0, 0, 0)
_MAT_HEADER_BYTES = 116  # the MAT-file's text header, which scipy fills with the time
_ROOT_SYNSET = ("n00001740", "entity")  # meta.mat's non-leaf synset (the WordNet root)


def pack_sample(tree: Path, out: Path, layout: str, seed: int) -> list[str]:
    """Writes the archives of `layout` for a generated sample tree into `out`.

    Args:
        tree: A tree written by `generate_sample`: train/<wnid>/, val/,
            LOC_val_solution.csv, LOC_synset_mapping.txt.
        out: The folder to create (its parent must exist).
        layout: "archives" or "kaggle_zip".
        seed: Seed of the ILSVRC2012_ID permutation (archives).

    Returns:
        The names of the files written, in `out`.
    """
    out.mkdir()
    if layout == "kaggle_zip":
        _write_kaggle_zip(tree, out / KAGGLE_ZIP)
        return [KAGGLE_ZIP]
    wnids = sorted(p.name for p in (tree / "train").iterdir())
    with tarfile.open(out / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid in wnids:
            inner = _tar_bytes((p.name, p.read_bytes()) for p in sorted((tree / "train" / wnid).iterdir()))
            _add(outer, f"{wnid}.tar", inner)
    with tarfile.open(out / VAL_TAR, "w", format=tarfile.GNU_FORMAT) as val:
        for path in sorted((tree / "val").iterdir()):
            _add(val, path.name, path.read_bytes())
    (out / DEVKIT).write_bytes(_devkit_bytes(tree, wnids, seed))
    return [TRAIN_TAR, VAL_TAR, DEVKIT]


def _add(tar: tarfile.TarFile, name: str, data: bytes, directory: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = len(data), _MTIME, 0, 0, "", ""
    info.type, info.mode = (tarfile.DIRTYPE, 0o755) if directory else (tarfile.REGTYPE, 0o644)
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: object) -> bytes:
    """A GNU tar of (name, bytes) pairs, in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:  # type: ignore[attr-defined]
            _add(tar, name, data)
    return buf.getvalue()


def _devkit_bytes(tree: Path, wnids: list[str], seed: int) -> bytes:
    """ILSVRC2012_devkit_t12.tar.gz: meta.mat and the val ground truth."""
    names = parse_synset_mapping((tree / SYNSET_MAPPING).read_bytes(), str(tree / SYNSET_MAPPING))
    labels = parse_val_solution((tree / VAL_SOLUTION).read_bytes(), str(tree / VAL_SOLUTION))
    ids = np.random.default_rng(np.random.SeedSequence([seed, len(wnids)])).permutation(len(wnids)) + 1
    id_of = {wnid: int(i) for wnid, i in zip(wnids, ids, strict=True)}
    val_count = len(list((tree / "val").iterdir()))
    truth = "".join(f"{id_of[labels[f'ILSVRC2012_val_{n:08d}']]}\n" for n in range(1, val_count + 1))
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for folder in (DEVKIT_DATA.split("/")[0], DEVKIT_DATA):
                _add(tar, folder, b"", directory=True)
            _add(tar, f"{DEVKIT_DATA}/{DEVKIT_META}", _meta_mat(wnids, id_of, names))
            _add(tar, f"{DEVKIT_DATA}/{DEVKIT_GROUND_TRUTH}", truth.encode())
    return buf.getvalue()


def _meta_mat(wnids: list[str], id_of: dict[str, int], names: dict[str, str]) -> bytes:
    """The devkit's meta.mat: a `synsets` struct array, leaves by ID, then the root."""
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images")  # fmt: skip
    leaves = sorted(wnids, key=id_of.__getitem__)
    synsets = np.zeros((len(leaves) + 1, 1), dtype=[(f, object) for f in fields])
    for row, wnid in enumerate(leaves):
        synsets[row, 0] = (
            np.array([[id_of[wnid]]]), np.array([wnid]), np.array([names.get(wnid, wnid)]),
            np.array([""]), np.array([[0]]), np.zeros((1, 0)), np.array([[0]]), np.array([[0]]),
        )  # fmt: skip
    root_id, (root_wnid, root_words) = len(leaves) + 1, _ROOT_SYNSET
    synsets[-1, 0] = (
        np.array([[root_id]]), np.array([root_wnid]), np.array([root_words]), np.array([""]),
        np.array([[len(leaves)]]), np.arange(1, root_id)[None, :], np.array([[1]]), np.array([[0]]),
    )  # fmt: skip
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    header = b"MATLAB 5.0 MAT-file, written by pipeline.data.sample_archives".ljust(_MAT_HEADER_BYTES)
    return header + buf.getvalue()[_MAT_HEADER_BYTES:]


def _write_kaggle_zip(tree: Path, path: Path) -> None:
    """imagenet-object-localization-challenge.zip of the tree."""
    with zipfile.ZipFile(path, "w") as zf:
        for name in (SYNSET_MAPPING, VAL_SOLUTION):
            _zip_add(zf, name, (tree / name).read_bytes())
        parts = KAGGLE_DATA.split("/")
        for depth in range(1, len(parts) + 1):
            _zip_add(zf, "/".join(parts[:depth]) + "/", b"")
        _zip_add(zf, f"{KAGGLE_DATA}/train/", b"")
        for folder in sorted((tree / "train").iterdir()):
            _zip_add(zf, f"{KAGGLE_DATA}/train/{folder.name}/", b"")
            for image in sorted(folder.iterdir()):
                _zip_add(zf, f"{KAGGLE_DATA}/train/{folder.name}/{image.name}", image.read_bytes())
        _zip_add(zf, f"{KAGGLE_DATA}/val/", b"")
        for image in sorted((tree / "val").iterdir()):
            _zip_add(zf, f"{KAGGLE_DATA}/val/{image.name}", image.read_bytes())


def _zip_add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.create_system = 3  # Unix: the mode bits below are read
    if name.endswith("/"):
        info.external_attr = (0o40755 << 16) | 0x10  # a folder, and MS-DOS's directory bit
    else:
        info.external_attr, info.compress_type = 0o100644 << 16, zipfile.ZIP_DEFLATED
    zf.writestr(info, data)
