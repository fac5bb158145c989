"""From the images an ImageNet layout holds to a Catalog, the same way for every layout.

A tree, the official archives and Kaggle's zip each list what they hold as `Found`
images (train ones by class folder or class tar, val ones with their labels) and
`build_catalog` turns them into records: class index = position of the wnid in the
sorted train wnids (torchvision's ImageFolder order), keys from file names, train by
label then file name, val by file name (the official order). So the same images give
the same records, and the same shards, whichever layout holds them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.data.archive_io import Location
from pipeline.data.records import Catalog, QuarantineRow, Record

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True, slots=True)
class Found:
    """An image a layout holds.

    Attributes:
        name: Its file name (no folder): the key and the order come from it.
        path: Where it is, for reports (`Record.path`).
        location: Its byte range in an archive; None for a file of its own.
    """

    name: str
    path: str
    location: Location | None = None


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def sample_key(file_name: str) -> str:
    """Sample key: the file name without extension, other dots made underscores."""
    return os.path.splitext(file_name)[0].replace(".", "_")


def label_val(images: Sequence[Found], labels: Mapping[str, str], source: str) -> list[tuple[Found, str]]:
    """Pairs val images with their wnids from a label file ({key: wnid}).

    Raises:
        ValueError: An image the labels lack (names it and `source`).
    """
    labelled = []
    for image in images:
        wnid = labels.get(sample_key(image.name))
        if wnid is None:
            raise ValueError(f"val image without a label in {source}: {image.path}")
        labelled.append((image, wnid))
    return labelled


def build_catalog(
    train: Mapping[str, Sequence[Found]],
    val: Sequence[tuple[Found, str]],
    names: Mapping[str, str],
    quarantine: Sequence[QuarantineRow] = (),
) -> Catalog:
    """The catalog of a layout's images.

    Args:
        train: {wnid: its train images}; every wnid is a class, even one whose images
            were all quarantined (so no class index depends on damage).
        val: (image, wnid) pairs.
        names: {wnid: human-readable name}; a wnid it lacks is its own name.
        quarantine: What the layout's listing already quarantined.

    Returns:
        Records in the module docstring's order, classes, names, quarantine rows.

    Raises:
        ValueError: No classes, a val wnid train lacks, or a key used twice in a split.
    """
    if not train:
        raise ValueError("no train classes")
    classes = sorted(train)
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    records = [
        Record("train", f.path, label_of[wnid], wnid, sample_key(f.name), location=f.location)
        for wnid in classes
        for f in sorted(train[wnid], key=lambda f: (f.name, f.path))
    ]
    for image, wnid in val:
        if wnid not in label_of:
            raise ValueError(f"val label {wnid!r} of {image.path} names a wnid train lacks")
    records += [
        Record("val", f.path, label_of[wnid], wnid, sample_key(f.name), location=f.location)
        for f, wnid in sorted(val, key=lambda pair: (pair[0].name, pair[0].path))
    ]
    for split in ("train", "val"):
        _check_unique_keys([r for r in records if r.split == split], split)
    return Catalog(records, classes, [names.get(wnid, wnid) for wnid in classes], list(quarantine))


def _check_unique_keys(records: list[Record], split: str) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.key in seen:
            raise ValueError(f"{split}: key {r.key!r} used by both {seen[r.key]} and {r.path}")
        seen[r.key] = r.path
