"""What ingestion hands to the shard writer: one labelled record per input image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "val")


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
