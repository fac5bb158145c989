"""What ingestion hands to the shard writer: one labelled record per input image, and
the one way to read a record's bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.data.archive_io import Location, read_member
from pipeline.data.pickling import pickled_by_fields
from pipeline.storage import read_bytes

SPLITS = ("train", "val")

QuarantineRow = tuple[str, str, str]  # (split, path, reason): a row of quarantine.csv


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Record:
    """One input image.

    Attributes:
        split: "train" or "val".
        path: Where it is, for reports: a local absolute path or a URI; for an archive
            member, the archive's then the member's name (`.../ILSVRC2012_img_val.tar/
            ILSVRC2012_val_00000001.JPEG`); for CIFAR, the batch file plus "#row".
        label: Class index, 0-based.
        wnid: WordNet id of the class (for CIFAR, the class name).
        key: Unique sample key within the split, without dots (WebDataset splits
            member names at the first dot).
        pixels: (32, 32, 3) uint8 RGB for CIFAR, which has no per-image files; None
            for file records.
        location: Where its bytes lie inside an archive; None for a file of its own.
    """

    split: str
    path: str
    label: int
    wnid: str
    key: str
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    location: Location | None = None


def read_record(rec: Record) -> bytes:
    """The encoded image of a file record: its own file, or its byte range in an archive.

    Raises:
        OSError: It cannot be read (missing, truncated, a damaged zip entry).
    """
    return read_bytes(rec.path) if rec.location is None else read_member(rec.location)


@dataclass(frozen=True, slots=True)
class Catalog:
    """The output of ingestion.

    Attributes:
        records: Train records (by label, then file name) then val records (official
            order, i.e. by file name).
        classes: Wnids (CIFAR: class names) in label order.
        names: Human-readable class names in label order.
        quarantine: Inputs ingestion found but cannot hand over (archive members that
            are not regular files, names outside the layout, duplicates, damaged tars),
            as quarantine.csv rows; each counts as one input.
    """

    records: list[Record]
    classes: list[str]
    names: list[str]
    quarantine: list[QuarantineRow] = field(default_factory=list)
