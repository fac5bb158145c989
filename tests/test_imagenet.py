"""Ingestion: ILSVRC trees with each val label form, errors, URIs, CIFAR-10 batches.

The tree builders here are also used by test_shards.py and test_stats.py.
"""

from __future__ import annotations

import csv
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.data.cifar import CIFAR_DIR, ingest_cifar10
from pipeline.data.imagenet import DEVKIT_GROUND_TRUTH, DEVKIT_META, ingest_imagenet

TRAIN = {"n02000002": 3, "n01000001": 2, "n03000003": 2}  # wnid -> images, deliberately unsorted
# Official val order with labels; ILSVRC2012_ID of a class = its rank in VAL_IDS.
VAL = ["n03000003", "n01000001", "n02000002", "n01000001"]
DEVKIT_IDS = {"n01000001": 1, "n02000002": 2, "n03000003": 3}


def image_bytes(
    seed: int, size: tuple[int, int] = (120, 90), fmt: str = "JPEG", **save: object
) -> bytes:
    """A smooth random RGB image of (width, height) `size`, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def val_name(i: int) -> str:
    """File name of the i-th (0-based) val image, as in ILSVRC-2012."""
    return f"ILSVRC2012_val_{i + 1:08d}.JPEG"


def make_imagenet(root: Path, val_form: str = "folders", train: dict[str, int] = TRAIN) -> Path:
    """Writes a tiny ILSVRC-shaped tree with val labels in `val_form`.

    val_form: "folders" (val/<wnid>/), "kaggle" (LOC_val_solution.csv), "devkit"
    (ground truth + meta.mat in the root) or "devkit_data" (in ILSVRC2012_devkit_t12/data).
    """
    exts = [".JPEG", ".jpg", ".Jpeg"]
    for c, (wnid, n) in enumerate(sorted(train.items())):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(n):
            (root / "train" / wnid / f"{wnid}_{i}{exts[i % 3]}").write_bytes(
                image_bytes(10 * c + i)
            )
    (root / "train" / "n01000001" / "notes.txt").write_text("not an image, ignored")
    for i, wnid in enumerate(VAL):
        folder = root / "val" / wnid if val_form == "folders" else root / "val"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / val_name(i)).write_bytes(image_bytes(100 + i))
    if val_form == "kaggle":
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            for i, wnid in reversed(list(enumerate(VAL))):  # row order must not matter
                w.writerow([val_name(i)[: -len(".JPEG")], f"{wnid} 1 2 30 40 {wnid} 5 6 7 8"])
    elif val_form.startswith("devkit"):
        data = root / "ILSVRC2012_devkit_t12" / "data" if val_form == "devkit_data" else root
        data.mkdir(parents=True, exist_ok=True)
        (data / DEVKIT_GROUND_TRUTH).write_text("".join(f"{DEVKIT_IDS[w]}\n" for w in VAL))
        write_meta_mat(data / DEVKIT_META)
    return root


def write_meta_mat(path: Path | io.BytesIO, words: dict[str, str] | None = None) -> None:
    """A devkit-like meta.mat: the leaf classes plus one non-leaf synset (ID 4); the
    words of a class are `words[wnid]`, by default "words <wnid>"."""
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    synsets = np.zeros((len(DEVKIT_IDS) + 1, 1), dtype=[(f, object) for f in fields])
    entries = [*DEVKIT_IDS.items(), ("n09999999", 4)]
    for row, (wnid, sid) in enumerate(entries):
        synsets[row, 0] = (
            np.array([[sid]]), np.array([wnid]), np.array([(words or {}).get(wnid, f"words {wnid}")]),
            np.array(["gloss"]),
            np.array([[0]]), np.zeros((1, 0)), np.array([[0]]), np.array([[10]]),
        )  # fmt: skip
    scipy.io.savemat(path, {"synsets": synsets})


def summary(records: list) -> list[tuple[str, str, int, str]]:
    return [(r.split, r.key, r.label, r.wnid) for r in records]


EXPECTED_VAL = [
    ("val", val_name(i)[: -len(".JPEG")], sorted(TRAIN).index(w), w) for i, w in enumerate(VAL)
]


@pytest.mark.parametrize("val_form", ["folders", "kaggle", "devkit", "devkit_data"])
def test_val_label_forms_agree(tmp_path: Path, val_form: str) -> None:
    catalog = ingest_imagenet(str(make_imagenet(tmp_path, val_form)))
    assert catalog.classes == sorted(TRAIN)
    assert summary([r for r in catalog.records if r.split == "val"]) == EXPECTED_VAL
    for r in catalog.records:
        assert Path(r.path).is_file() and Path(r.path).stem.replace(".", "_") == r.key


def test_train_order_labels_and_extensions(tmp_path: Path) -> None:
    catalog = ingest_imagenet(str(make_imagenet(tmp_path)))
    train = [r for r in catalog.records if r.split == "train"]
    expected = [
        ("train", f"{w}_{i}", label, w)
        for label, w in enumerate(sorted(TRAIN))
        for i in range(TRAIN[w])
    ]
    assert summary(train) == expected  # .JPEG/.jpg/.Jpeg all taken, notes.txt ignored
    assert catalog.records[: len(train)] == train  # train first, then val
    assert catalog.names == catalog.classes  # no LOC_synset_mapping.txt


def test_png_extension_and_synset_names(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path, "kaggle")
    (root / "train" / "n03000003" / "extra.PNG").write_bytes(image_bytes(7, fmt="PNG"))
    (root / "LOC_synset_mapping.txt").write_text(
        "n01000001 goldfish, Carassius auratus\nn02000002 tench\nn03000003 great white shark\n"
    )
    catalog = ingest_imagenet(str(root))
    assert "extra" in [r.key for r in catalog.records if r.wnid == "n03000003"]
    assert catalog.names == ["goldfish, Carassius auratus", "tench", "great white shark"]


def test_file_uri_equals_plain_path(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path, "devkit")
    plain = ingest_imagenet(str(root))
    uri = ingest_imagenet(f"file://{root}")
    assert summary(uri.records) == summary(plain.records)
    assert all(r.path.startswith("file://") for r in uri.records)
    assert [r.path.removeprefix("file://") for r in uri.records] == [r.path for r in plain.records]


def test_error_val_labels_missing(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path, "devkit")
    (root / DEVKIT_META).unlink()
    with pytest.raises(FileNotFoundError, match="val labels missing.*LOC_val_solution.csv"):
        ingest_imagenet(str(root))


def test_error_val_wnid_not_in_train(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path, "folders")
    (root / "val" / "n09999999").mkdir()
    (root / "val" / "n09999999" / val_name(9)).write_bytes(image_bytes(1))
    with pytest.raises(ValueError, match=r"n09999999.*ILSVRC2012_val_00000010.*train lacks"):
        ingest_imagenet(str(root))


def test_error_val_id_not_in_meta(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path, "devkit")
    (root / DEVKIT_GROUND_TRUTH).write_text("1\n2\n77\n1\n")
    with pytest.raises(ValueError, match=r"ground_truth.txt:3: ILSVRC2012_ID 77"):
        ingest_imagenet(str(root))


@pytest.mark.parametrize("val_form", ["folders", "kaggle", "devkit"])
def test_error_val_image_without_label(tmp_path: Path, val_form: str) -> None:
    root = make_imagenet(tmp_path, val_form)
    (root / "val" / val_name(len(VAL))).write_bytes(image_bytes(1))  # one past the labels
    with pytest.raises(ValueError, match=f"val image without a label.*{val_name(len(VAL))}"):
        ingest_imagenet(str(root))


def test_error_empty_train(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path, "folders")
    for f in (root / "train").rglob("*.*"):
        f.unlink()
    with pytest.raises(ValueError, match=f"empty train.*{root / 'train'}"):
        ingest_imagenet(str(root))


def test_error_class_folder_without_images(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path, "folders")
    (root / "train" / "n04000004").mkdir()
    with pytest.raises(ValueError, match="without images.*n04000004"):
        ingest_imagenet(str(root))


def test_error_missing_train(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no folder {tmp_path / 'train'}"):
        ingest_imagenet(str(tmp_path))


# --- CIFAR-10 -------------------------------------------------------------------------

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR_PER_BATCH = 3


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python-2 str (BINSTRING) and numpy under numpy.core, like the
    official CIFAR batches (cPickle, protocol 2)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_pixels(batch: int) -> np.ndarray:
    """(N, 32, 32, 3) uint8 of one fake batch: smooth images, which JPEG keeps well."""
    pngs = [image_bytes(50 * batch + i, (32, 32), "PNG") for i in range(CIFAR_PER_BATCH)]
    return np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in pngs])


def make_cifar(root: Path) -> Path:
    """A fake cifar-10-batches-py/ with CIFAR_PER_BATCH images per batch."""
    folder = root / CIFAR_DIR
    folder.mkdir(parents=True)
    meta = {
        b"label_names": [c.encode() for c in CIFAR_CLASSES],
        b"num_cases_per_batch": CIFAR_PER_BATCH,
    }
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        px = cifar_pixels(b)
        batch = {
            b"batch_label": name.encode(),
            b"labels": [(b + i) % 10 for i in range(CIFAR_PER_BATCH)],
            # rows: 1024 R, 1024 G, 1024 B, each row-major 32x32
            b"data": px.transpose(0, 3, 1, 2).reshape(CIFAR_PER_BATCH, -1),
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(CIFAR_PER_BATCH)],
        }
        # numpy >= 2 names its module numpy._core: test both spellings.
        payload = py2_pickle(batch) if b % 2 else pickle.dumps(batch, protocol=4)
        (folder / name).write_bytes(payload)
    return root


def test_cifar_batches(tmp_path: Path) -> None:
    catalog = ingest_cifar10(str(make_cifar(tmp_path)))
    assert catalog.classes == CIFAR_CLASSES == catalog.names
    train = [r for r in catalog.records if r.split == "train"]
    val = [r for r in catalog.records if r.split == "val"]
    assert len(train) == 5 * CIFAR_PER_BATCH and len(val) == CIFAR_PER_BATCH
    assert train[0].key == "cifar_train_00001" and train[-1].key == "cifar_train_00015"
    assert val[0].key == "cifar_val_00001"
    fourth = train[CIFAR_PER_BATCH]  # first image of data_batch_2
    assert fourth.label == 1 and fourth.wnid == "automobile"
    assert fourth.path.endswith("data_batch_2#0")
    np.testing.assert_array_equal(fourth.pixels, cifar_pixels(1)[0])
    np.testing.assert_array_equal(val[2].pixels, cifar_pixels(5)[2])
    # the parent folder works too
    assert [r.key for r in ingest_cifar10(str(tmp_path / CIFAR_DIR)).records] == [
        r.key for r in catalog.records
    ]


def test_cifar_refuses_other_globals(tmp_path: Path) -> None:
    root = make_cifar(tmp_path)

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    (root / CIFAR_DIR / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": Evil()}, protocol=4)
    )
    with pytest.raises(pickle.UnpicklingError, match="refusing global builtins.print"):
        ingest_cifar10(str(root))
