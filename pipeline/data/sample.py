"""Deterministic synthetic data set with the exact layout of the ILSVRC-2012 download.

The tree written by :func:`generate_sample` looks like the Kaggle form of ILSVRC-2012
(ImageNet CLS-LOC), so every reader in the pipeline can run on it unchanged::

    <out_dir>/train/<wnid>/<wnid>_<id>.JPEG       ids: sorted, unique, non-contiguous
    <out_dir>/val/ILSVRC2012_val_<8 digits>.JPEG  flat, numbered 1.., classes interleaved
    <out_dir>/LOC_val_solution.csv                ImageId,PredictionString (wnid x0 y0 x1 y1 ...)
    <out_dir>/LOC_synset_mapping.txt              "wnid name, name" for the chosen classes

Classes are real ILSVRC-2012 wnids and names (the package's copy of the 1000-line
LOC_synset_mapping.txt), spread evenly over the sorted list: class ``j`` of ``n`` is
synset ``j * 1000 // n`` (10 classes: synsets 0, 100, ..., 900).

Image content: class ``j`` of the generated set (its rank, not its wnid) gets design
``j``. A design is a shape (40 kinds) x a fill (solid, outline, stripes, checker, dots)
x a modifier (plain, squashed, halved, bordered, paired): 1000 designs, listed in
:mod:`pipeline.data.sample_shapes`; designs 0-9 are the ten most distinct ones.
:mod:`pipeline.data.sample_render` draws one object of the class at a random position,
size, rotation and colour (always contrasting with the background in luminance, so the
class survives greyscale) over clutter. This module picks the classes, the file quirks
and the seeds, and writes the files.

File quirks of the real set are reproduced (see the spec's "Known quirks"): mostly
500x375 / 375x500 / 500x333 pictures, ~5% small ones, ~1.5% over 1000 px, JPEG quality
75-95, ~10% progressive, ~2% greyscale, CMYK JPEGs and one PNG saved under a .JPEG name
in train. The first training images carry one of each quirk, so even a 2-class set
holds them all.

Everything is a pure function of the parameters: every image draws from its own
``numpy.random.SeedSequence([seed, split, ...])`` stream, and no time or global state
is used, so the same parameters give byte-identical files.

``sample.layout`` other than ``tree`` packs the tree into the archives people download
instead (:mod:`pipeline.data.sample_archives`): the official tars and devkit
(``archives``) or Kaggle's zip (``kaggle_zip``); ``out_dir`` then holds only those.
``cifar10`` writes the same designs as 32-px images in CIFAR-10's own files instead
(:mod:`pipeline.data.sample_cifar`), for the paper's Figure 1.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.data.ilsvrc import NUM_SYNSETS
from pipeline.data.sample_archives import pack_sample
from pipeline.data.sample_cifar import label_names, write_cifar_sample
from pipeline.data.sample_render import Box, render
from pipeline.data.sample_shapes import DESIGNS, Design
from pipeline.storage import publish_dir

if TYPE_CHECKING:
    from pipeline.config import SampleParams

MAPPING_FILE = "LOC_synset_mapping.txt"
SOLUTION_FILE = "LOC_val_solution.csv"

# SeedSequence "split" words: keep every random stream independent of the others.
_TRAIN, _VAL, _TRAIN_IDS, _VAL_ORDER, _CSV_ORDER = range(5)

# One of each quirk goes to the first training images (spread over the classes), so
# that tiny sets still contain all of them.
_FORCED_TRAITS = ("png", "cmyk", "grey", "progressive", "small", "large")

_SIZE_KINDS = (
    "500x375",
    "375x500",
    "500x333",
    "333x500",
    "landscape",
    "portrait",
    "small",
    "large",
)
_SIZE_PROBS = (0.51, 0.18, 0.12, 0.04, 0.065, 0.02, 0.05, 0.015)


# --------------------------------------------------------------------------- synsets


def load_synsets(path: Path | str | None = None) -> list[tuple[str, str]]:
    """Reads a LOC_synset_mapping.txt file.

    Args:
        path: The file to read; by default the package's copy of the ILSVRC-2012 list
            (1000 lines, sorted by wnid, class index = line number).

    Returns:
        ``(wnid, names)`` pairs in file order, e.g. ``("n01440764", "tench, Tinca tinca")``.

    Raises:
        ValueError: A line is not ``n<8 digits> <names>``.
    """
    if path is None:
        text = resources.files("pipeline.data").joinpath(MAPPING_FILE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    synsets = []
    for number, line in enumerate(text.splitlines(), start=1):
        wnid, _, names = line.partition(" ")
        if len(wnid) != 9 or wnid[0] != "n" or not wnid[1:].isdigit() or not names.strip():
            raise ValueError(f"{path or MAPPING_FILE}:{number}: expected 'n<8 digits> <names>', got {line!r}")
        synsets.append((wnid, names))
    return synsets


def select_classes(num_classes: int) -> list[tuple[str, str]]:
    """Picks ``num_classes`` ILSVRC-2012 synsets spread evenly over the sorted 1000.

    Class ``j`` is synset ``j * 1000 // num_classes``, so the choice is deterministic,
    stays sorted by wnid and covers the whole hierarchy (animals and objects alike).

    Args:
        num_classes: How many classes, 2 to 1000.

    Returns:
        ``(wnid, names)`` pairs, sorted by wnid.

    Raises:
        ValueError: ``num_classes`` is out of range.
    """
    _check_int("num_classes", num_classes, 2, NUM_SYNSETS)
    synsets = load_synsets()
    return [synsets[j * NUM_SYNSETS // num_classes] for j in range(num_classes)]


def design_name(rank: int) -> str:
    """Names the content drawn for the class of a given rank in a generated set.

    Args:
        rank: Position of the class among the generated ones (0 = first wnid), 0 to 999.

    Returns:
        ``"shape/fill/modifier"``, e.g. ``"disc/outline/plain"`` (a ring).
    """
    _check_int("rank", rank, 0, NUM_SYNSETS - 1)
    return "/".join(DESIGNS[rank])


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _Encoding:
    kind: str  # "rgb", "grey", "cmyk" (JPEGs) or "png" (PNG bytes under a .JPEG name)
    quality: int
    progressive: bool


def _choose_encoding(rng: np.random.Generator, split: int, trait: str | None) -> _Encoding:
    quality = int(rng.integers(75, 96))
    progressive = trait == "progressive" or rng.random() < 0.1
    draw = rng.random()
    if trait in ("png", "cmyk", "grey"):
        kind = trait
    elif draw < 0.02:
        kind = "grey"
    elif split == _TRAIN and draw < 0.022:  # CMYK JPEGs only occur in train, as in ImageNet
        kind = "cmyk"
    else:
        kind = "rgb"
    return _Encoding(kind, quality, progressive)


def _choose_size(rng: np.random.Generator, trait: str | None) -> tuple[int, int]:
    kind = trait if trait in ("small", "large") else str(rng.choice(_SIZE_KINDS, p=_SIZE_PROBS))
    if "x" in kind:
        width, height = kind.split("x")
        return int(width), int(height)
    if kind == "landscape":
        return 500, int(rng.integers(280, 500))
    if kind == "portrait":
        return int(rng.integers(280, 500)), 500
    long_side = int(rng.integers(200, 301) if kind == "small" else rng.integers(1024, 1601))
    short_side = round(long_side * float(rng.choice((0.75, 2 / 3))))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def _save(image: Image.Image, encoding: _Encoding, path: Path) -> None:
    if encoding.kind == "png":
        image.save(path, format="PNG")
        return
    if encoding.kind != "rgb":
        image = image.convert("L" if encoding.kind == "grey" else "CMYK")
    image.save(path, format="JPEG", quality=encoding.quality, progressive=encoding.progressive)


def _write_image(
    seed: int,
    split: int,
    key: tuple[int, ...],
    design: Design,
    trait: str | None,
    path: Path,
) -> tuple[_Encoding, list[Box]]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, split, *key]))
    encoding = _choose_encoding(rng, split, trait)
    image, boxes = render(rng, design, _choose_size(rng, trait))
    _save(image, encoding, path)
    return encoding, boxes


def _train_ids(seed: int, rank: int, count: int) -> list[int]:
    # Real file numbers are sparse (n01440764_10026.JPEG), so readers must not assume 1..N.
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TRAIN_IDS, rank]))
    return sorted(int(i) + 1 for i in rng.choice(max(16000, 4 * count), size=count, replace=False))


def _forced_trait(rank: int, index: int, num_classes: int) -> str | None:
    position = index * num_classes + rank  # quirk q goes to class q % n, image q // n
    return _FORCED_TRAITS[position] if position < len(_FORCED_TRAITS) else None


class _Tally:
    """Counts the quirks written, for the summary."""

    def __init__(self) -> None:
        self.png_as_jpeg: list[str] = []
        self.cmyk: list[str] = []
        self.greyscale = 0
        self.progressive = 0

    def add(self, encoding: _Encoding, relative: str) -> None:
        if encoding.kind == "png":
            self.png_as_jpeg.append(relative)
        elif encoding.kind == "cmyk":
            self.cmyk.append(relative)
        self.greyscale += encoding.kind == "grey"
        self.progressive += encoding.progressive and encoding.kind != "png"

    def as_dict(self) -> dict:
        return {
            "png_as_jpeg": self.png_as_jpeg,
            "cmyk": self.cmyk,
            "greyscale": self.greyscale,
            "progressive": self.progressive,
        }


def _write_train(root: Path, seed: int, wnids: list[str], per_class: int, tally: _Tally) -> None:
    for rank, wnid in enumerate(wnids):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for index, file_id in enumerate(_train_ids(seed, rank, per_class)):
            relative = f"train/{wnid}/{wnid}_{file_id}.JPEG"
            trait = _forced_trait(rank, index, len(wnids))
            encoding, _ = _write_image(seed, _TRAIN, (rank, index), DESIGNS[rank], trait, root / relative)
            tally.add(encoding, relative)


def _write_val(root: Path, seed: int, wnids: list[str], per_class: int, tally: _Tally) -> None:
    (root / "val").mkdir()
    order_rng = np.random.default_rng(np.random.SeedSequence([seed, _VAL_ORDER]))
    labels = order_rng.permutation(np.repeat(np.arange(len(wnids)), per_class))
    rows = []
    for number, rank in enumerate(labels.tolist(), start=1):
        image_id = f"ILSVRC2012_val_{number:08d}"
        relative = f"val/{image_id}.JPEG"
        encoding, boxes = _write_image(seed, _VAL, (number,), DESIGNS[rank], None, root / relative)
        tally.add(encoding, relative)
        rows.append((image_id, " ".join(f"{wnids[rank]} {x0} {y0} {x1} {y1}" for x0, y0, x1, y1 in boxes)))
    # The real LOC_val_solution.csv is not sorted by ImageId; neither is this one.
    csv_rng = np.random.default_rng(np.random.SeedSequence([seed, _CSV_ORDER]))
    with open(root / SOLUTION_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("ImageId", "PredictionString"))
        writer.writerows(rows[i] for i in csv_rng.permutation(len(rows)))


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    in_range = isinstance(value, (int, np.integer)) and low <= value and (high is None or value <= high)
    if isinstance(value, bool) or not in_range:
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"sample.{name}={value!r}: expected an integer {allowed}")


def generate_sample(out_dir: Path | str, params: SampleParams) -> dict:
    """Writes a synthetic ILSVRC-2012-shaped data set (see the module docstring).

    The tree is built in a sibling ``<out_dir>.tmp-*`` folder and published with
    `pipeline.storage.publish_dir` only when complete, so an interrupted run never
    leaves a tree that looks finished; an existing ``out_dir`` is replaced.

    Args:
        out_dir: Where the tree goes (missing parent folders are created).
        params: The ``sample`` section: ``num_classes`` (2 to 1000, picked evenly from
            the 1000 synsets), ``train_per_class`` (2 to 1300), ``val_per_class`` (1 to
            50), ``seed`` (any integer >= 0; equal params give byte-identical files)
            and ``layout`` (tree, archives, kaggle_zip or cifar10).

    Returns:
        A summary: ``root``, ``layout``, ``files`` (the names in ``root``), ``seed``,
        ``num_classes``, ``train_images``, ``val_images``, ``classes`` (wnids, class
        index order; for cifar10 the label names), ``designs`` (what each class shows)
        and ``quirks`` (PNG and CMYK file paths as in the tree, greyscale and
        progressive counts).

    """
    num_classes, seed = params.num_classes, params.seed
    train_per_class, val_per_class = params.train_per_class, params.val_per_class
    out_dir = Path(out_dir)
    classes = select_classes(num_classes)
    wnids = [wnid for wnid, _ in classes]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    packed = tmp.with_name(f"{tmp.name}-{params.layout}")
    tmp.mkdir()
    tally = _Tally()
    try:
        if params.layout == "cifar10":
            files = write_cifar_sample(tmp, params)
            publish_dir(tmp, out_dir)
            wnids = label_names(num_classes)
        else:
            files = _write_ilsvrc(tmp, packed, out_dir, params, classes, tally)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(packed, ignore_errors=True)
        raise
    return {
        "root": str(out_dir),
        "layout": params.layout,
        "files": files,
        "seed": seed,
        "num_classes": num_classes,
        "train_images": num_classes * train_per_class,
        "val_images": num_classes * val_per_class,
        "classes": wnids,
        "designs": [design_name(rank) for rank in range(num_classes)],
        "quirks": tally.as_dict(),
    }


def _write_ilsvrc(
    tmp: Path,
    packed: Path,
    out_dir: Path,
    params: SampleParams,
    classes: list[tuple[str, str]],
    tally: _Tally,
) -> list[str]:
    """Writes the ILSVRC-shaped tree into `tmp`, packs it as `params.layout` asks and
    publishes it as `out_dir`; returns the names in `out_dir`."""
    wnids = [wnid for wnid, _ in classes]
    (tmp / MAPPING_FILE).write_text("".join(f"{w} {n}\n" for w, n in classes), encoding="utf-8")
    _write_train(tmp, params.seed, wnids, params.train_per_class, tally)
    _write_val(tmp, params.seed, wnids, params.val_per_class, tally)
    if params.layout == "tree":
        files = sorted(p.name for p in tmp.iterdir())
        publish_dir(tmp, out_dir)
        return files
    files = pack_sample(tmp, packed, params.layout, params.seed)
    shutil.rmtree(tmp)
    publish_dir(packed, out_dir)
    return files
