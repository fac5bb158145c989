"""Ingestion: list an ILSVRC-2012 tree as labelled records.

The data root is a local path or any URI `pyarrow.fs` understands (file://, s3://,
gs://). Class index = position of the wnid in the sorted train wnids (torchvision's
ImageFolder order). Validation labels are read from, in this order of preference:

1. `val/<wnid>/*` folders;
2. Kaggle's `LOC_val_solution.csv` (ImageId, "wnid x y x y ...") in the root;
3. the devkit's `ILSVRC2012_validation_ground_truth.txt` (1-based ILSVRC2012_IDs, line
   i labelling `ILSVRC2012_val_<i>`) + `meta.mat`, in the root or in
   `ILSVRC2012_devkit_t12/data/`.
"""

from __future__ import annotations

import csv
import io
import os

import pyarrow.fs as pafs
import scipy.io

from pipeline.data.records import Catalog, Record
from pipeline.storage import is_file, join, read_bytes, resolve

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_DIRS = ("", "ILSVRC2012_devkit_t12/data")


def _list_images(root: str, rel: str) -> dict[str, list[str]]:
    """Lists `root/rel/` one level of folders deep.

    Returns:
        {subfolder name or "" for files directly in rel: sorted image file names}.
        Every subfolder appears, even without images.

    Raises:
        FileNotFoundError: `root/rel` is not a folder.
    """
    fs, base = resolve(join(root, rel))
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no folder {join(root, rel)}")
    tree: dict[str, list[str]] = {}
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        parts = info.path[len(base) :].strip("/").split("/")
        if info.type == pafs.FileType.Directory and len(parts) == 1:
            tree.setdefault(parts[0], [])
        elif info.type == pafs.FileType.File and info.base_name.lower().endswith(IMAGE_EXTENSIONS):
            if len(parts) <= 2:
                tree.setdefault("" if len(parts) == 1 else parts[0], []).append(parts[-1])
    return {folder: sorted(names) for folder, names in sorted(tree.items())}


def _key(file_name: str) -> str:
    """Sample key: the file name without extension, other dots made underscores."""
    return os.path.splitext(file_name)[0].replace(".", "_")


def _check_unique_keys(records: list[Record], split: str) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.key in seen:
            raise ValueError(f"{split}: key {r.key!r} used by both {seen[r.key]} and {r.path}")
        seen[r.key] = r.path


def ingest_imagenet(root: str) -> Catalog:
    """Lists an ILSVRC-2012 tree (train/<wnid>/*, val/ with labels) as records.

    Args:
        root: Local path or URI of the folder holding train/ and val/.

    Returns:
        The catalog: records in a deterministic order, classes, names.

    Raises:
        FileNotFoundError: train/ or val/ missing, or no val labels found.
        ValueError: empty train, a class folder without images, images outside class
            folders, a val label naming a wnid train lacks, a val image without a
            label, or a key used twice.
    """
    train_tree = _list_images(root, "train")
    loose = train_tree.pop("", [])
    if loose:
        raise ValueError(f"{join(root, 'train')} holds images outside class folders: {loose[:3]}")
    empty = [wnid for wnid, files in train_tree.items() if not files]
    if not train_tree or len(empty) == len(train_tree):
        raise ValueError(f"empty train: no images under {join(root, 'train')}/<wnid>/")
    if empty:
        raise ValueError(f"class folders without images under {join(root, 'train')}: {empty[:5]}")
    classes = sorted(train_tree)
    label_of = {wnid: i for i, wnid in enumerate(classes)}

    train = [
        Record("train", join(root, "train", wnid, name), label_of[wnid], wnid, _key(name))
        for wnid in classes
        for name in train_tree[wnid]
    ]
    val = [
        Record("val", join(root, "val", *rel.split("/")), -1, wnid, _key(rel.split("/")[-1]))
        for rel, wnid in _val_labels(root)
    ]
    for r in val:
        if r.wnid not in label_of:
            raise ValueError(f"val label {r.wnid!r} of {r.path} names a wnid train lacks")
    val = [Record(r.split, r.path, label_of[r.wnid], r.wnid, r.key) for r in val]
    _check_unique_keys(train, "train")
    _check_unique_keys(val, "val")
    return Catalog(train + val, classes, _synset_names(root, classes))


def _val_labels(root: str) -> list[tuple[str, str]]:
    """Returns [(path relative to val/, wnid)] in official order (by file name)."""
    val_tree = _list_images(root, "val")
    loose = val_tree.pop("", [])
    if val_tree:
        if loose:
            raise ValueError(f"val image without a label: {join(root, 'val', loose[0])}")
        pairs = [(f"{wnid}/{name}", wnid) for wnid, names in val_tree.items() for name in names]
        return sorted(pairs, key=lambda p: (p[0].split("/")[1], p[0]))
    if is_file(join(root, KAGGLE_VAL_CSV)):
        by_id = _kaggle_val_labels(join(root, KAGGLE_VAL_CSV))
        source = join(root, KAGGLE_VAL_CSV)
    else:
        by_id = _devkit_val_labels(root)
        source = "the devkit ground truth"
    labelled = []
    for name in loose:
        wnid = by_id.get(_key(name))
        if wnid is None:
            raise ValueError(f"val image without a label in {source}: {join(root, 'val', name)}")
        labelled.append((name, wnid))
    return labelled


def _kaggle_val_labels(uri: str) -> dict[str, str]:
    """Reads LOC_val_solution.csv: {ImageId: wnid}, the first PredictionString token."""
    rows = csv.DictReader(io.StringIO(read_bytes(uri).decode("utf-8")))
    if rows.fieldnames is None or not {"ImageId", "PredictionString"} <= set(rows.fieldnames):
        raise ValueError(f"{uri}: expected the header ImageId,PredictionString")
    return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}


def _devkit_val_labels(root: str) -> dict[str, str]:
    """Reads the devkit ground truth + meta.mat: {"ILSVRC2012_val_<8 digits>": wnid}."""
    for folder in DEVKIT_DIRS:
        truth, meta = join(root, folder, DEVKIT_GROUND_TRUTH), join(root, folder, DEVKIT_META)
        if is_file(truth) and is_file(meta):
            break
    else:
        looked = ", ".join(join(root, folder) for folder in DEVKIT_DIRS)
        raise FileNotFoundError(
            f"val labels missing: no val/<wnid>/ folders, no {join(root, KAGGLE_VAL_CSV)}, "
            f"and no {DEVKIT_GROUND_TRUTH} + {DEVKIT_META} in {looked}"
        )
    synsets = scipy.io.loadmat(io.BytesIO(read_bytes(meta)), squeeze_me=True)["synsets"]
    wnid_of_id = {
        int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], strict=True)
    }
    labels = {}
    for line_no, line in enumerate(read_bytes(truth).decode("ascii").split(), start=1):
        if int(line) not in wnid_of_id:
            raise ValueError(f"{truth}:{line_no}: ILSVRC2012_ID {line} is not in {meta}")
        labels[f"ILSVRC2012_val_{line_no:08d}"] = wnid_of_id[int(line)]
    return labels


def _synset_names(root: str, classes: list[str]) -> list[str]:
    """Class names from LOC_synset_mapping.txt ("wnid name, name, ..."), else the wnids."""
    if not is_file(join(root, SYNSET_MAPPING)):
        return list(classes)
    names = {}
    for line in read_bytes(join(root, SYNSET_MAPPING)).decode("utf-8").splitlines():
        wnid, _, name = line.strip().partition(" ")
        names[wnid] = name or wnid
    return [names.get(wnid, wnid) for wnid in classes]
