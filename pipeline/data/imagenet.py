"""Ingestion: list an ILSVRC-2012 tree (or CIFAR-10 python batches) as labelled records.

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
import functools
import io
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import scipy.io

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_DIRS = ("", "ILSVRC2012_devkit_t12/data")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_SIDE = 32


@dataclass(frozen=True)
class Record:
    """One input image.

    Attributes:
        split: "train" or "val".
        path: Where to read it: a local absolute path or a URI (for CIFAR, the batch
            file plus "#row", for the quarantine report only).
        label: Class index, 0-based.
        wnid: WordNet id of the class (for CIFAR, the class name).
        key: Unique sample key within the split, without dots (WebDataset splits
            member names at the first dot).
        pixels: (32, 32, 3) uint8 RGB for CIFAR, which has no per-image files; None
            for file records.
    """

    split: str
    path: str
    label: int
    wnid: str
    key: str
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Catalog:
    """The output of ingestion.

    Attributes:
        records: Train records (by label, then file name) then val records (official
            order, i.e. by file name).
        classes: Wnids (CIFAR: class names) in label order.
        names: Human-readable class names in label order.
    """

    records: list[Record]
    classes: list[str]
    names: list[str]


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Maps a local path or URI to a pyarrow filesystem and a path inside it.

    Filesystems are cached per scheme and bucket, so resolving many files of one root
    builds one client.

    Args:
        uri: A local path (made absolute) or a URI such as file:///x, s3://bucket/x.

    Returns:
        (filesystem, path inside it).
    """
    if "://" not in uri:
        return _filesystem("file://"), os.path.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return _filesystem("file://"), rest
    # pyarrow's object-store paths are "bucket/key", i.e. the URI without its scheme.
    return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), rest


@functools.cache
def _filesystem(root_uri: str) -> pafs.FileSystem:
    """Builds (once) the filesystem serving a scheme + bucket."""
    if root_uri == "file://":
        return pafs.LocalFileSystem()
    return pafs.FileSystem.from_uri(root_uri)[0]


def read_bytes(uri: str) -> bytes:
    """Reads a whole file given as a local path or URI."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return f.read()


def _join(root: str, *parts: str) -> str:
    """Joins path parts (empty ones skipped) onto a root that may be a URI."""
    return "/".join([root.rstrip("/"), *(p for p in parts if p)])


def _is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def _list_images(root: str, rel: str) -> dict[str, list[str]]:
    """Lists `root/rel/` one level of folders deep.

    Returns:
        {subfolder name or "" for files directly in rel: sorted image file names}.
        Every subfolder appears, even without images.

    Raises:
        FileNotFoundError: `root/rel` is not a folder.
    """
    fs, base = resolve(_join(root, rel))
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no folder {_join(root, rel)}")
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
        raise ValueError(f"{_join(root, 'train')} holds images outside class folders: {loose[:3]}")
    empty = [wnid for wnid, files in train_tree.items() if not files]
    if not train_tree or len(empty) == len(train_tree):
        raise ValueError(f"empty train: no images under {_join(root, 'train')}/<wnid>/")
    if empty:
        raise ValueError(f"class folders without images under {_join(root, 'train')}: {empty[:5]}")
    classes = sorted(train_tree)
    label_of = {wnid: i for i, wnid in enumerate(classes)}

    train = [
        Record("train", _join(root, "train", wnid, name), label_of[wnid], wnid, _key(name))
        for wnid in classes
        for name in train_tree[wnid]
    ]
    val = [
        Record("val", _join(root, "val", *rel.split("/")), -1, wnid, _key(rel.split("/")[-1]))
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
            raise ValueError(f"val image without a label: {_join(root, 'val', loose[0])}")
        pairs = [(f"{wnid}/{name}", wnid) for wnid, names in val_tree.items() for name in names]
        return sorted(pairs, key=lambda p: (p[0].split("/")[1], p[0]))
    if _is_file(_join(root, KAGGLE_VAL_CSV)):
        by_id = _kaggle_val_labels(_join(root, KAGGLE_VAL_CSV))
        source = _join(root, KAGGLE_VAL_CSV)
    else:
        by_id = _devkit_val_labels(root)
        source = "the devkit ground truth"
    labelled = []
    for name in loose:
        wnid = by_id.get(_key(name))
        if wnid is None:
            raise ValueError(f"val image without a label in {source}: {_join(root, 'val', name)}")
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
        truth, meta = _join(root, folder, DEVKIT_GROUND_TRUTH), _join(root, folder, DEVKIT_META)
        if _is_file(truth) and _is_file(meta):
            break
    else:
        looked = ", ".join(_join(root, folder) for folder in DEVKIT_DIRS)
        raise FileNotFoundError(
            f"val labels missing: no val/<wnid>/ folders, no {_join(root, KAGGLE_VAL_CSV)}, "
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
    if not _is_file(_join(root, SYNSET_MAPPING)):
        return list(classes)
    names = {}
    for line in read_bytes(_join(root, SYNSET_MAPPING)).decode("utf-8").splitlines():
        wnid, _, name = line.strip().partition(" ")
        names[wnid] = name or wnid
    return [names.get(wnid, wnid) for wnid in classes]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler refusing every global except the three numpy arrays need.

    The CIFAR batches are dicts of bytes, lists and one ndarray. Unpickling an ndarray
    calls `numpy.core.multiarray._reconstruct(numpy.ndarray, shape, dtype)` and then
    `numpy.dtype(...)`; those build plain arrays and run no user code, so they are the
    only callables allowed. Python-2 pickles (the official files) name the module
    numpy.core, numpy >= 2 pickles numpy._core: both map to the current objects.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None


def _load_cifar_batch(uri: str) -> dict[bytes, object]:
    # encoding="bytes": the official batches are Python-2 pickles of str keys.
    return _NumpyOnlyUnpickler(io.BytesIO(read_bytes(uri)), encoding="bytes").load()


def ingest_cifar10(root: str) -> Catalog:
    """Lists CIFAR-10 (python batches) as records carrying their pixels.

    The five data batches become split "train", test_batch becomes split "val".
    Keys are `cifar_<split>_<5-digit 1-based index>`; the wnid-equivalent is the
    class name from batches.meta. The pixels travel in the records (60,000 x 3 KiB).

    Args:
        root: Local path or URI of `cifar-10-batches-py/` or of its parent.

    Returns:
        The catalog; classes and names are both the class names in label order.

    Raises:
        FileNotFoundError: a batch file is missing.
        pickle.UnpicklingError: a batch references anything but numpy arrays.
    """
    if not _is_file(_join(root, "batches.meta")):
        root = _join(root, CIFAR_DIR)
    names = [n.decode() for n in _load_cifar_batch(_join(root, "batches.meta"))[b"label_names"]]
    records = []
    for split, batches in (("train", CIFAR_TRAIN_BATCHES), ("val", (CIFAR_TEST_BATCH,))):
        index = 0
        for batch_name in batches:
            uri = _join(root, batch_name)
            batch = _load_cifar_batch(uri)
            # (N, 3072) uint8, channel-major rows -> (N, 32, 32, 3)
            pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(
                -1, 3, CIFAR_SIDE, CIFAR_SIDE
            )
            pixels = pixels.transpose(0, 2, 3, 1)
            for row, label in enumerate(batch[b"labels"]):
                index += 1
                records.append(
                    Record(
                        split,
                        f"{uri}#{row}",
                        int(label),
                        names[label],
                        f"cifar_{split}_{index:05d}",
                        np.ascontiguousarray(pixels[row]),
                    )
                )
    return Catalog(records, names, list(names))
