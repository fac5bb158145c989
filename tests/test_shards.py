"""The per-image function and the Ray shard stage: quirks, geometry, quarantine,
determinism, atomic reruns, round trips in both formats."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile
from test_imagenet import CIFAR_CLASSES, cifar_pixels, image_bytes, make_cifar, make_imagenet
from torchvision import transforms

from pipeline.config import ShardParams
from pipeline.data.cifar import ingest_cifar10
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.preprocess import (
    Processed,
    Rejected,
    _decode_turbo,
    _preprocess_pillow,
    decode_jpeg,
    preprocess_image,
)
from pipeline.data.shard_writer import TooManyBadFilesError, warm_workers, write_shards
from pipeline.data.shards import ShardMeta, read_shards

SIZE = 64  # small stored images keep the tests fast; the geometry is size-independent
SHARD = 3
BAD_FILES = {  # planted in train/n01000001, file name -> (bytes, expected reason)
    "n01000001_zero.JPEG": (b"", "empty file"),
    "n01000001_trunc.JPEG": (image_bytes(1, (200, 150))[:900], "truncated image"),
    "n01000001_noise.JPEG": (np.random.default_rng(0).bytes(3000), "not an image"),
    "n01000001_text.JPEG": (b"<html>404 Not Found</html>\n", "not an image"),
}


def encode(img: Image.Image, fmt: str = "JPEG", **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def quirk_files() -> dict[str, bytes]:
    """The odd-but-valid files of the real train set, under .JPEG names."""
    smooth = Image.open(io.BytesIO(image_bytes(3, (160, 120))))
    return {
        "n02000002_cmyk.JPEG": encode(smooth.convert("CMYK")),
        "n02000002_grey.JPEG": encode(smooth.convert("L")),
        "n02000002_png.JPEG": encode(smooth, "PNG"),
        "n02000002_prog.JPEG": encode(smooth, progressive=True),
    }


def reference(data: bytes, size: int) -> np.ndarray:
    """The naive pipeline (torchvision Resize + CenterCrop), as float (H, W, 3)."""
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
    return np.asarray(tf(Image.open(io.BytesIO(data)).convert("RGB")), dtype=np.float64)


# --- the per-image function -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(quirk_files()))
def test_quirk_files_become_rgb(name: str) -> None:
    data = quirk_files()[name]
    out = preprocess_image(data, size=SIZE)
    assert isinstance(out, Processed)
    pixels = decode_jpeg(out.jpeg)
    assert Image.open(io.BytesIO(out.jpeg)).mode == "RGB" and pixels.shape == (SIZE, SIZE, 3)
    assert (out.src_height, out.src_width) == (120, 160)
    assert np.abs(pixels - reference(data, SIZE)).mean() < 3


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [
        ((0, 255, 255, 0), (255, 0, 0)),
        ((255, 0, 255, 0), (0, 255, 0)),
        ((0, 0, 0, 128), (127, 127, 127)),
    ],
)
def test_cmyk_colour(cmyk: tuple[int, ...], rgb: tuple[int, ...]) -> None:
    # Pillow writes Adobe-marked (inverted) CMYK, as Photoshop did for ImageNet's 22.
    data = encode(Image.new("CMYK", (80, 60), cmyk), quality=95)
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None
    pixels = decode_jpeg(preprocess_image(data, size=SIZE).jpeg)
    assert np.abs(pixels.mean(axis=(0, 1)) - rgb).max() < 4


@pytest.mark.parametrize("landscape", [True, False])
def test_short_side_then_centre_crop(landscape: bool) -> None:
    # 400 x 200: bands red | green | blue of 100, 200, 100 px. Short side -> 256 scales
    # by 1.28; the central 256 columns map back to exactly the green band.
    bands = np.zeros((200, 400, 3), np.uint8)
    bands[:, :100, 0] = bands[:, 100:300, 1] = bands[:, 300:, 2] = 255
    img = Image.fromarray(bands if landscape else bands.transpose(1, 0, 2))
    out = preprocess_image(encode(img, quality=95))
    pixels = decode_jpeg(out.jpeg).astype(int)
    assert pixels.shape == (256, 256, 3) and (out.height, out.width) == (256, 256)
    inner = pixels[4:-4, 4:-4]
    assert (inner[..., 1] > 240).all() and (inner[..., [0, 2]] < 15).all()
    assert (pixels[..., 1] > 160).all()  # edge columns: only filter leak, no red/blue band


@pytest.mark.parametrize("size_wh", [(500, 375), (375, 500), (2000, 1500), (90, 70)])
def test_matches_naive_pipeline(size_wh: tuple[int, int]) -> None:
    data = image_bytes(4, size_wh, quality=92)
    out = preprocess_image(data)
    assert (out.src_width, out.src_height) == size_wh  # original size even after draft()
    assert np.abs(decode_jpeg(out.jpeg) - reference(data, 256)).mean() < 3


def test_cifar_pixels_input() -> None:
    px = cifar_pixels(0)[0]
    out = preprocess_image(px, size=32, quality=95)
    assert np.abs(decode_jpeg(out.jpeg).astype(int) - px).mean() < 3


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_is_rejected_not_raised(name: str) -> None:
    data, reason = BAD_FILES[name]
    out = preprocess_image(data, size=SIZE)
    assert isinstance(out, Rejected) and out.reason.startswith(reason)


def test_truncated_progressive_and_missing_eoi_rejected() -> None:
    full = image_bytes(5, (300, 200), progressive=True)
    for cut in (full[: len(full) // 2], full[:-2]):
        out = preprocess_image(cut, size=SIZE)
        assert isinstance(out, Rejected) and out.reason.startswith("truncated image")


def test_libjpeg_turbo_takes_ycbcr_and_grey_jpegs_pillow_the_rest() -> None:
    # The fast path must really run (a header misread once sent every file to Pillow).
    files = quirk_files() | {"plain.JPEG": image_bytes(6, (500, 375), quality=90)}
    taken = {name: _decode_turbo(data, SIZE) is not None for name, data in files.items()}
    assert taken == {
        "plain.JPEG": True,
        "n02000002_grey.JPEG": True,
        "n02000002_prog.JPEG": True,
        "n02000002_cmyk.JPEG": False,  # libjpeg-turbo has no CMYK -> RGB
        "n02000002_png.JPEG": False,
    }
    assert _decode_turbo(files["plain.JPEG"][:-2], SIZE) is None  # no EOI: Pillow rejects it


@pytest.mark.parametrize("size_wh", [(500, 375), (375, 500), (1200, 900)])
def test_libjpeg_turbo_and_pillow_paths_agree(size_wh: tuple[int, int]) -> None:
    data = image_bytes(7, size_wh, quality=90)
    fast = decode_jpeg(preprocess_image(data).jpeg).astype(int)
    slow = decode_jpeg(_preprocess_pillow(data, 256, 90).jpeg).astype(int)
    assert np.abs(fast - slow).mean() < 1.0


def test_refuses_to_run_with_truncated_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        preprocess_image(image_bytes(1), size=SIZE)


# --- the Ray stage ----------------------------------------------------------------------


def make_tree(root: Path) -> Path:
    """Tiny ILSVRC tree plus the quirk files and the planted bad files in train."""
    make_imagenet(root, "kaggle")
    for name, data in quirk_files().items():
        (root / "train" / "n02000002" / name).write_bytes(data)
    for name, (data, _) in BAD_FILES.items():
        (root / "train" / "n01000001" / name).write_bytes(data)
    return root


def shard(root: Path, out: Path, max_in_flight: int | None = None, **kw: object) -> dict:
    """Shards `root` into `out` with the test's settings, `kw` overriding `shard` params."""
    catalog = ingest_imagenet(str(root))
    settings = ShardParams(**({"size": SIZE, "shard_size": SHARD, "max_bad_fraction": 0.5} | kw))
    return write_shards(
        catalog.records, out, classes=catalog.classes, settings=settings, max_in_flight=max_in_flight,
        progress=False,
    )  # fmt: skip


def digest(out: Path) -> dict[str, str]:
    """sha256 of every file under `out`, by relative path."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sharded(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(source root, shard dir, metrics) of one clean run, shared by the checks below."""
    base = tmp_path_factory.mktemp("stage")
    root = make_tree(base / "src")
    return root, base / "out", shard(root, base / "out")


def test_every_input_accounted_for(sharded: tuple[Path, Path, dict]) -> None:
    root, out, metrics = sharded
    n_train = sum(1 for p in (root / "train").rglob("*") if p.suffix.lower() == ".jpeg" or p.suffix == ".jpg")
    assert metrics["inputs"] == {"train": n_train, "val": 4}
    assert metrics["quarantined"] == {"train": len(BAD_FILES), "val": 0}
    for split in ("train", "val"):
        assert metrics["inputs"][split] == metrics["sharded"][split] + metrics["quarantined"][split]
    assert metrics["bad_fraction"] == pytest.approx(len(BAD_FILES) / (n_train + 4))
    with open(out / "quarantine.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((Path(r["path"]).name, r["split"]) for r in rows) == sorted(
        (name, "train") for name in BAD_FILES
    )
    for r in rows:
        assert r["reason"].startswith(BAD_FILES[Path(r["path"]).name][1])


def test_layout_meta_and_formats_agree(sharded: tuple[Path, Path, dict]) -> None:
    _, out, metrics = sharded
    meta = ShardMeta.read(str(out))
    assert meta.classes == meta.names == ["n01000001", "n02000002", "n03000003"]
    assert meta.counts == metrics["sharded"] and (meta.size, meta.quality) == (SIZE, 90)
    n_train_shards = -(-metrics["inputs"]["train"] // SHARD)
    assert meta.shards["parquet"]["train"] == [
        f"parquet/train/part-{i:05d}.parquet" for i in range(n_train_shards)
    ]
    assert not list(out.rglob("*.tmp")) and not list(out.parent.glob(".out.*"))
    for split in ("train", "val"):
        for pq_rel, tar_rel in zip(
            meta.shards["parquet"][split], meta.shards["webdataset"][split], strict=True
        ):
            table = pq.read_table(out / pq_rel)
            assert table.schema.field("label").type == "int64"
            assert set(table["height"].to_pylist() + table["width"].to_pylist()) <= {SIZE}
            with tarfile.open(out / tar_rel) as tar:
                members = [(m.name, tar.extractfile(m).read()) for m in tar]
            expected = []
            for key, label, jpeg in zip(
                *(table[c].to_pylist() for c in ("key", "label", "jpeg")), strict=True
            ):
                expected += [(f"{key}.jpg", jpeg), (f"{key}.cls", str(label).encode())]
            assert members == expected
    val = pq.read_table(out / "parquet/val/part-00000.parquet")["key"].to_pylist()
    assert val == sorted(val)  # official order kept


def test_train_shards_are_shuffled_and_seeded(sharded: tuple[Path, Path, dict], tmp_path: Path) -> None:
    root, out, _ = sharded

    def train_keys(d: Path) -> list[str]:
        parts = sorted((d / "parquet" / "train").glob("*.parquet"))
        return [k for p in parts for k in pq.read_table(p)["key"].to_pylist()]

    keys = train_keys(out)
    assert keys != sorted(keys)  # class-mixed, not in ingestion order
    shard(root, tmp_path / "other", seed=1, format="parquet")
    assert sorted(train_keys(tmp_path / "other")) == sorted(keys) != train_keys(tmp_path / "other")


def test_deterministic_across_runs_and_scheduling(sharded: tuple[Path, Path, dict], tmp_path: Path) -> None:
    root, out, _ = sharded
    shard(root, tmp_path / "again", max_in_flight=1)
    assert digest(tmp_path / "again") == digest(out)


def test_rerun_after_interruption_equals_clean_run(sharded: tuple[Path, Path, dict], tmp_path: Path) -> None:
    root, out, _ = sharded
    dirty = tmp_path / "out"
    # What a killed run leaves: a stale staging folder with a partial shard, and an
    # older output with a truncated part, a stray *.tmp and no meta.json.
    (tmp_path / ".out.staging" / "parquet" / "train").mkdir(parents=True)
    (tmp_path / ".out.staging" / "parquet" / "train" / "part-00000.parquet.tmp").write_bytes(b"PAR1")
    (dirty / "parquet" / "train").mkdir(parents=True)
    part = (out / "parquet" / "train" / "part-00000.parquet").read_bytes()
    (dirty / "parquet" / "train" / "part-00000.parquet").write_bytes(part[: len(part) // 2])
    (dirty / "parquet" / "train" / "part-00001.parquet.tmp").write_bytes(part[:100])
    (dirty / "webdataset" / "val").mkdir(parents=True)
    (dirty / "webdataset" / "val" / "shard-00007.tar").write_bytes(b"stale")
    shard(root, dirty)
    assert digest(dirty) == digest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_too_many_bad_files_raises_after_report(sharded: tuple[Path, Path, dict], tmp_path: Path) -> None:
    root, _, metrics = sharded
    total = sum(metrics["inputs"].values())
    with pytest.raises(TooManyBadFilesError, match=rf"4 of {total} inputs.*max_bad_fraction=0\.001"):
        shard(root, tmp_path / "out", max_bad_fraction=0.001)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["quarantine.csv"]
    assert len((tmp_path / "out" / "quarantine.csv").read_text().splitlines()) == 1 + len(BAD_FILES)


def test_quarantine_header_when_nothing_is_bad(ray_local: None, tmp_path: Path) -> None:
    root = make_imagenet(tmp_path / "src", "folders")
    metrics = shard(root, tmp_path / "out", format="webdataset", max_bad_fraction=0.0)
    assert metrics["bad_fraction"] == 0.0
    assert (tmp_path / "out" / "quarantine.csv").read_text() == "split,path,reason\n"
    assert not (tmp_path / "out" / "parquet").exists()


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_round_trip(sharded: tuple[Path, Path, dict], fmt: str) -> None:
    root, out, metrics = sharded
    sources = {p.stem: p.read_bytes() for p in root.rglob("*.*") if p.suffix != ".csv"}
    for split in ("train", "val"):
        raw = {r["key"]: r for r in read_shards(str(out), split, fmt=fmt, decode=False).take_all()}
        rows = {r["key"]: r for r in read_shards(str(out), split, fmt=fmt).take_all()}
        assert len(rows) == len(raw) == metrics["sharded"][split]
        stored = pq.read_table(out / "parquet" / split)
        labels = dict(zip(stored["key"].to_pylist(), stored["label"].to_pylist(), strict=True))
        for key, row in rows.items():
            assert row["label"] == raw[key]["label"] == labels[key]
            assert isinstance(row["label"], (int, np.integer))
            assert row["image"].dtype == np.uint8 and row["image"].shape == (SIZE, SIZE, 3)
            np.testing.assert_array_equal(row["image"], decode_jpeg(raw[key]["jpeg"]))
            assert np.abs(row["image"] - reference(sources[key], SIZE)).mean() < 3


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_read_shards_streams_one_block_per_shard_in_stored_order(
    sharded: tuple[Path, Path, dict], fmt: str
) -> None:
    # One block per file, so training's first batch waits for one shard, not all of them.
    _, out, _ = sharded
    files = sorted((out / "parquet" / "train").glob("*.parquet"))
    blocks = list(read_shards(str(out), "train", fmt=fmt, decode=False).iter_batches(batch_size=None))
    assert [list(b["key"]) for b in blocks] == [pq.read_table(f)["key"].to_pylist() for f in files]


def test_warm_workers_reaches_every_cpu(ray_local: None) -> None:
    import ray

    refs = warm_workers()
    assert len(refs) == int(ray.cluster_resources()["CPU"])
    assert ray.get(refs) == [None] * len(refs)


def test_local_ray_gets_ports_ray_never_picks_itself(ray_local: None) -> None:
    """start_local_ray's GCS and dashboard ports lie outside Ray's workers' 10002-19999 and
    the kernel's ephemeral range, where Ray picks its other components' ports: Ray refused
    to start when one of those equalled a port handed to it."""
    import ray
    from ray._private.worker import get_dashboard_url

    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    gcs = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    dashboard = int(get_dashboard_url().rsplit(":", 1)[1])
    assert gcs != dashboard
    assert all(20000 <= port < first_ephemeral for port in (gcs, dashboard)), (gcs, dashboard)


def test_read_shards_through_file_uri(sharded: tuple[Path, Path, dict]) -> None:
    _, out, metrics = sharded
    ds = read_shards(f"file://{out}", "val", fmt="webdataset", decode=False)
    assert ds.count() == metrics["sharded"]["val"]


def test_cifar_shards(ray_local: None, tmp_path: Path) -> None:
    catalog = ingest_cifar10(str(make_cifar(tmp_path / "src")))
    settings = ShardParams(size=32, quality=95, shard_size=4, max_bad_fraction=0.0)
    metrics = write_shards(catalog.records, tmp_path / "out", classes=catalog.classes, settings=settings)
    assert metrics["sharded"] == {"train": 15, "val": 3}
    rows = {r["key"]: r for r in read_shards(str(tmp_path / "out"), "val").take_all()}
    for i in range(3):
        row = rows[f"cifar_val_{i + 1:05d}"]
        assert row["label"] == (5 + i) % 10
        assert np.abs(row["image"].astype(int) - cifar_pixels(5)[i]).mean() < 3
    assert ShardMeta.read(str(tmp_path / "out")).classes == CIFAR_CLASSES
