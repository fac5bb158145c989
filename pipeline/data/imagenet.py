"""Ingestion: list ImageNet (ILSVRC-2012) as labelled records, from any of its layouts.

`data.raw` is a local path or any URI `pyarrow.fs` understands (file://, s3://, gs://)
naming one of three layouts, recognised from what is there:

1. a tree: `train/<wnid>/*` and `val/`;
2. the official archives (`ILSVRC2012_img_train.tar`, `ILSVRC2012_img_val.tar`,
   `ILSVRC2012_devkit_t12.tar.gz`), read in place (`pipeline.data.archives`);
3. Kaggle's `imagenet-object-localization-challenge.zip` (the folder holding it, or
   the zip itself), read in place too.

In a tree, validation labels are read from, in this order of preference:

1. `val/<wnid>/*` folders;
2. Kaggle's `LOC_val_solution.csv` (ImageId, "wnid x y x y ...") in the root;
3. the devkit's `ILSVRC2012_validation_ground_truth.txt` (1-based ILSVRC2012_IDs, line
   i labelling `ILSVRC2012_val_<i>`) + `meta.mat`, in the root or in
   `ILSVRC2012_devkit_t12/data/`.

Class order, keys and record order are `pipeline.data.catalog`'s, for every layout.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from pipeline.data.archives import ingest_kaggle_zip, ingest_official
from pipeline.data.catalog import Found, build_catalog, is_image_name, label_val
from pipeline.data.ilsvrc_names import (
    DEVKIT_GROUND_TRUTH,
    DEVKIT_META,
    KAGGLE_ZIP,
    OFFICIAL_ARCHIVES,
    SYNSET_MAPPING,
    VAL_SOLUTION,
)
from pipeline.data.labels import (
    parse_ground_truth,
    parse_meta_mat,
    parse_synset_mapping,
    parse_val_solution,
)
from pipeline.data.records import Catalog
from pipeline.storage import absolute, is_file, join, read_bytes, resolve

DEVKIT_DIRS = ("", "ILSVRC2012_devkit_t12/data")


def ingest_imagenet(root: str) -> Catalog:
    """Lists ImageNet in whichever layout `root` holds (see the module docstring).

    Args:
        root: Local path or URI of the folder holding the tree, the official archives
            or Kaggle's zip; or of the zip itself.

    Returns:
        The catalog: records in a deterministic order, classes, names, and (archives)
        the members ingestion quarantined.

    Raises:
        FileNotFoundError: No layout recognised (the message names `root` and the
            three layouts), an incomplete set of official archives, or, in a tree,
            train/ or val/ or the val labels missing.
        ValueError: `root` holds more than one layout; or, as the layout's reader says,
            empty train, a class without images, images outside class folders, a val
            label naming a wnid train lacks, a val image without a label, a key used
            twice, a bad line in a label file ("<file>:<line>: ...").
    """
    root = absolute(root)  # records' paths reach shard tasks, which run in their own cwd
    layout, where = detect_layout(root)
    if layout == "archives":
        return ingest_official(root)
    if layout == "kaggle_zip":
        return ingest_kaggle_zip(where)
    return _ingest_tree(root)


def detect_layout(root: str) -> tuple[str, str]:
    """("tree" | "archives" | "kaggle_zip", the root or the zip's URI) for `root`.

    Raises:
        FileNotFoundError: None of the three layouts, or only some official archives.
        ValueError: More than one layout.
    """
    if root.lower().endswith(".zip") and is_file(root):
        return "kaggle_zip", root
    fs, base = resolve(root)
    found = []
    if fs.get_file_info(join(base, "train")).type == pafs.FileType.Directory:
        found.append(("tree", root))
    archives = [name for name in OFFICIAL_ARCHIVES if is_file(join(root, name))]
    if archives:
        missing = [name for name in OFFICIAL_ARCHIVES if name not in archives]
        if missing:
            raise FileNotFoundError(f"{root}: holds {', '.join(archives)} but not {', '.join(missing)}")
        found.append(("archives", root))
    if is_file(join(root, KAGGLE_ZIP)):
        found.append(("kaggle_zip", join(root, KAGGLE_ZIP)))
    if len(found) > 1:
        layouts = ", ".join(layout for layout, _ in found)
        raise ValueError(f"{root}: holds more than one layout ({layouts}); point data.raw at one")
    if not found:
        raise FileNotFoundError(
            f"{root}: no ImageNet layout found (no folder {join(root, 'train')}); expected one of: "
            f"a tree (train/<wnid>/*.JPEG, val/ with labels), the official archives "
            f"({', '.join(OFFICIAL_ARCHIVES)}), or Kaggle's {KAGGLE_ZIP}"
        )
    return found[0]


def _list_images(root: str, rel: str) -> dict[str, list[Found]]:
    """Lists `root/rel/` one level of folders deep.

    Returns:
        {subfolder name or "" for files directly in rel: its images}. Every subfolder
        appears, even without images.

    Raises:
        FileNotFoundError: `root/rel` is not a folder.
    """
    fs, base = resolve(join(root, rel))
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no folder {join(root, rel)}")
    tree: dict[str, list[Found]] = {}
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        parts = info.path[len(base) :].strip("/").split("/")
        if info.type == pafs.FileType.Directory and len(parts) == 1:
            tree.setdefault(parts[0], [])
        elif info.type == pafs.FileType.File and is_image_name(info.base_name) and len(parts) <= 2:
            image = Found(parts[-1], join(root, rel, *parts))
            tree.setdefault("" if len(parts) == 1 else parts[0], []).append(image)
    return dict(sorted(tree.items()))


def _ingest_tree(root: str) -> Catalog:
    """Lists an ILSVRC-2012 tree (train/<wnid>/*, val/ with labels)."""
    train = _list_images(root, "train")
    loose = train.pop("", [])
    if loose:
        names = [f.name for f in loose[:3]]
        raise ValueError(f"{join(root, 'train')} holds images outside class folders: {names}")
    empty = [wnid for wnid, files in train.items() if not files]
    if not train or len(empty) == len(train):
        raise ValueError(f"empty train: no images under {join(root, 'train')}/<wnid>/")
    if empty:
        raise ValueError(f"class folders without images under {join(root, 'train')}: {empty[:5]}")
    return build_catalog(train, _val_labels(root), _synset_names(root))


def _val_labels(root: str) -> list[tuple[Found, str]]:
    """Val images with their wnids."""
    val_tree = _list_images(root, "val")
    loose = val_tree.pop("", [])
    if val_tree:
        if loose:
            raise ValueError(f"val image without a label: {loose[0].path}")
        return [(image, wnid) for wnid, images in val_tree.items() for image in images]
    if is_file(join(root, VAL_SOLUTION)):
        source = join(root, VAL_SOLUTION)
        return label_val(loose, parse_val_solution(read_bytes(source), source), source)
    return label_val(loose, _devkit_val_labels(root), "the devkit ground truth")


def _devkit_val_labels(root: str) -> dict[str, str]:
    """Reads the devkit ground truth + meta.mat: {"ILSVRC2012_val_<8 digits>": wnid}."""
    for folder in DEVKIT_DIRS:
        truth, meta = join(root, folder, DEVKIT_GROUND_TRUTH), join(root, folder, DEVKIT_META)
        if is_file(truth) and is_file(meta):
            break
    else:
        looked = ", ".join(join(root, folder) for folder in DEVKIT_DIRS)
        raise FileNotFoundError(
            f"val labels missing: no val/<wnid>/ folders, no {join(root, VAL_SOLUTION)}, "
            f"and no {DEVKIT_GROUND_TRUTH} + {DEVKIT_META} in {looked}"
        )
    wnid_of_id, _ = parse_meta_mat(read_bytes(meta), meta)
    return parse_ground_truth(read_bytes(truth), truth, wnid_of_id, meta)


def _synset_names(root: str) -> dict[str, str]:
    """Class names from LOC_synset_mapping.txt ("wnid name, name, ..."), if there is one."""
    mapping = join(root, SYNSET_MAPPING)
    return parse_synset_mapping(read_bytes(mapping), mapping) if is_file(mapping) else {}
