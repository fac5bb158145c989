"""Ingesting ImageNet from its archives in place: the official tars and Kaggle's zip.

Nothing is extracted. Each archive is indexed once (member name, data offset, size):
a pass over the tar headers that seeks past the data, descending into each per-class
tar of ILSVRC2012_img_train.tar over its byte range (several at once, since object
storage answers each read after tens of ms), or the zip's central directory. Records
carry their `Location`, from which the shard tasks read the bytes with ranged reads.
The index lives in memory only: data.raw is never written to.

The official layout: ILSVRC2012_img_train.tar holds `<wnid>.tar` per class, each
holding that class's images; ILSVRC2012_img_val.tar holds the val images, flat; the
devkit ILSVRC2012_devkit_t12.tar.gz holds `ILSVRC2012_devkit_t12/data/meta.mat` and
`.../ILSVRC2012_validation_ground_truth.txt` (read from inside the .tar.gz). Kaggle's
zip holds `ILSVRC/Data/CLS-LOC/{train/<wnid>/,val/}` images and the root files
LOC_val_solution.csv and LOC_synset_mapping.txt; the rest of it (test images,
annotations, image sets, other LOC_ files, folder entries) is known and not an input.

What cannot be an input goes to the catalog's quarantine with its reason: members that
are not regular files, names outside the layout (a "../x.JPEG" among them), every
member of a name but the last (as extraction would keep the last), damaged tars (their
members before the damage are kept).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from pipeline.data.archive_io import (
    ArchiveFile,
    Location,
    ZipCoding,
    fetch_size,
    open_archive,
    read_member,
    stat_archive,
)
from pipeline.data.catalog import Found, build_catalog, is_image_name, label_val
from pipeline.data.ilsvrc_names import (
    DEVKIT,
    DEVKIT_DATA,
    DEVKIT_GROUND_TRUTH,
    DEVKIT_META,
    KAGGLE_DATA,
    SYNSET_MAPPING,
    TRAIN_TAR,
    VAL_SOLUTION,
    VAL_TAR,
)
from pipeline.data.labels import (
    parse_ground_truth,
    parse_meta_mat,
    parse_synset_mapping,
    parse_val_solution,
)
from pipeline.data.records import Catalog, QuarantineRow
from pipeline.data.tar_index import TarListing, TarMember, index_tar
from pipeline.data.zip_index import ZipEntry, index_zip
from pipeline.storage import join, read_bytes

# Parts of Kaggle's zip that are known and not inputs (no labels, or not images).
KAGGLE_OTHER = ("ILSVRC/Annotations/", "ILSVRC/ImageSets/", f"{KAGGLE_DATA}/test/", "LOC_")
INDEX_THREADS = 16  # per-class tars indexed at once
OUTSIDE = "outside the expected layout"


def ingest_official(root: str) -> Catalog:
    """Lists the official archives in `root` (see the module docstring).

    Raises:
        FileNotFoundError: An archive or a devkit file missing.
        ValueError: A damaged devkit, a bad line in its ground truth, an intact class
            tar without images, a val image without a label, a key used twice.
    """
    labels, words, truth = _read_devkit(join(root, DEVKIT))  # small, and wrong labels fail first
    train, quarantine = _index_train(join(root, TRAIN_TAR))
    val_images, val_quarantine = _index_val(join(root, VAL_TAR))
    val = label_val(val_images, labels, truth)
    return build_catalog(train, val, words, quarantine + val_quarantine)


def _read_devkit(uri: str) -> tuple[dict[str, str], dict[str, str], str]:
    """({val key: wnid}, {wnid: words}, the ground truth's name) from the devkit .tar.gz."""
    wanted = {name: f"{DEVKIT_DATA}/{name}" for name in (DEVKIT_META, DEVKIT_GROUND_TRUTH)}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(read_bytes(uri)), mode="r:gz") as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                for key, member in wanted.items():
                    if name == member and info.isreg():
                        found[key] = tar.extractfile(info).read()  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{uri}: damaged devkit archive: {err}") from None
    missing = [member for key, member in wanted.items() if key not in found]
    if missing:
        raise FileNotFoundError(f"{uri}: no regular file {' or '.join(missing)} in it")
    meta, truth = join(uri, wanted[DEVKIT_META]), join(uri, wanted[DEVKIT_GROUND_TRUTH])
    wnid_of_id, words = parse_meta_mat(found[DEVKIT_META], meta)
    return parse_ground_truth(found[DEVKIT_GROUND_TRUTH], truth, wnid_of_id, meta), words, truth


def _index_train(uri: str) -> tuple[dict[str, list[Found]], list[QuarantineRow]]:
    """{wnid: images} of the train tar, and its quarantine rows."""
    archive, fetch = stat_archive(uri), fetch_size(uri)
    handle = open_archive(archive)
    outer = index_tar(handle, 0, archive.size, fetch)
    quarantine = _damage_row("train", uri, outer)
    class_tars: dict[str, TarMember] = {}
    for member, problem in _usable_members(outer.members):
        name = member.name
        if problem is None and not (_is_flat(name) and name.endswith(".tar") and len(name) > 4):
            problem = f"{OUTSIDE}: expected <wnid>.tar"
        if problem is None:
            class_tars[name.removesuffix(".tar")] = member
        else:
            quarantine.append(("train", _shown(uri, name), problem))
    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        listings = list(pool.map(lambda m: index_tar(handle, m.offset, m.size, fetch), class_tars.values()))
    train: dict[str, list[Found]] = {}
    empty = []
    for wnid, listing in zip(class_tars, listings, strict=True):
        inner = join(uri, f"{wnid}.tar")
        train[wnid], rows = _flat_images("train", inner, archive, listing)
        quarantine += rows
        if not train[wnid] and listing.damage is None:
            empty.append(wnid)
    if empty:
        raise ValueError(f"class tars without images in {uri}: {[f'{w}.tar' for w in empty[:5]]}")
    return train, quarantine


def _index_val(uri: str) -> tuple[list[Found], list[QuarantineRow]]:
    """The val tar's images, and its quarantine rows."""
    archive = stat_archive(uri)
    listing = index_tar(open_archive(archive), 0, archive.size, fetch_size(uri))
    return _flat_images("val", uri, archive, listing)


def _flat_images(
    split: str, base: str, archive: ArchiveFile, listing: TarListing
) -> tuple[list[Found], list[QuarantineRow]]:
    """A tar's images (regular files with image names, no folders) and quarantine rows."""
    images, quarantine = [], _damage_row(split, base, listing)
    for member, problem in _usable_members(listing.members):
        if problem is None and not (_is_flat(member.name) and is_image_name(member.name)):
            problem = f"{OUTSIDE}: expected a printable image file name, no folders"
        if problem is None:
            location = Location(archive, member.offset, member.size)
            images.append(Found(member.name, join(base, member.name), location))
        else:
            quarantine.append((split, _shown(base, member.name), problem))
    return images, quarantine


def _usable_members(members: Sequence[TarMember]) -> list[tuple[TarMember, str | None]]:
    """(member, None) for each usable member, (member, reason) for the others: not a
    whole regular file, or replaced by a later member of the same name."""
    last = {m.name: i for i, m in enumerate(members)}
    out = []
    for i, m in enumerate(members):
        if last[m.name] != i:
            replaced_by = members[last[m.name]].offset
            out.append((m, f"duplicate name: the member at byte {replaced_by} replaces it"))
        else:
            out.append((m, m.problem))
    return out


def _damage_row(split: str, uri: str, listing: TarListing) -> list[QuarantineRow]:
    return [] if listing.damage is None else [(split, uri, listing.damage)]


def _is_flat(name: str) -> bool:
    """A plain file name: printable (so valid UTF-8: undecodable bytes are not), no
    folder, no backslash, not "." or ".."."""
    return name.isprintable() and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _shown(base: str, name: str) -> str:
    """The report path of a member: its name's undecodable bytes written as \\xNN."""
    return join(base, name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


def ingest_kaggle_zip(uri: str) -> Catalog:
    """Lists Kaggle's ImageNet zip at `uri` (see the module docstring).

    Raises:
        FileNotFoundError: The zip lacks LOC_val_solution.csv.
        ValueError: Not a zip, a damaged central directory, a bad line in a LOC_ file,
            a val image without a label, a key used twice.
    """
    archive = stat_archive(uri)
    entries = index_zip(open_archive(archive), uri)
    train: dict[str, list[Found]] = {}
    val: list[Found] = []
    meta: dict[str, ZipEntry] = {}
    quarantine: list[QuarantineRow] = []
    last = {e.name: i for i, e in enumerate(entries)}
    for i, entry in enumerate(entries):
        split, wnid, problem = _kaggle_place(entry)
        if split == "meta":
            meta[entry.name] = entry
            continue
        if split == "other":
            continue
        if problem is None and last[entry.name] != i:
            replaced_by = entries[last[entry.name]].header_offset
            problem = f"duplicate name: the entry at byte {replaced_by} replaces it"
        if problem is not None:
            quarantine.append((split, _shown(uri, entry.name), problem))
            continue
        image = Found(entry.name.rsplit("/", 1)[-1], join(uri, entry.name), _zip_location(archive, entry))
        if split == "train":
            train.setdefault(wnid, []).append(image)
        else:
            val.append(image)
    if VAL_SOLUTION not in meta:
        raise FileNotFoundError(f"{uri}: no regular file {VAL_SOLUTION} in it (it labels val)")
    solution = join(uri, VAL_SOLUTION)
    labels = parse_val_solution(read_member(_zip_location(archive, meta[VAL_SOLUTION])), solution)
    names = {}
    if SYNSET_MAPPING in meta:
        mapping = read_member(_zip_location(archive, meta[SYNSET_MAPPING]))
        names = parse_synset_mapping(mapping, join(uri, SYNSET_MAPPING))
    return build_catalog(train, label_val(val, labels, solution), names, quarantine)


def _kaggle_place(entry: ZipEntry) -> tuple[str, str, str | None]:
    """(split | "meta" | "other", wnid or "", why it cannot be an input or None) of an entry.

    "other": a folder entry or a known part that is not an input (skipped). An entry
    outside the layout is quarantined under val if a folder of its path is named val,
    else under train.
    """
    name, parts = entry.name, entry.name.split("/")
    if name in (VAL_SOLUTION, SYNSET_MAPPING) and entry.problem is None:
        return "meta", "", None
    if ".." not in parts and (entry.is_dir or name.startswith(KAGGLE_OTHER)):
        return "other", "", None
    split = "val" if "val" in parts[:-1] else "train"
    rest = parts[4:] if name.startswith(f"{KAGGLE_DATA}/{split}/") else []
    if len(rest) != (2 if split == "train" else 1) or not all(map(_is_flat, rest)) or not is_image_name(name):
        expected = f"{KAGGLE_DATA}/{'train/<wnid>/' if split == 'train' else 'val/'}<image>"
        return split, "", f"{OUTSIDE}: expected {expected}"
    if entry.problem is not None:
        return split, "", entry.problem
    return split, rest[0] if split == "train" else "", None


def _zip_location(archive: ArchiveFile, entry: ZipEntry) -> Location:
    coding = ZipCoding(entry.method, entry.crc32, entry.file_size)
    return Location(archive, entry.header_offset, entry.compressed_size, coding)
