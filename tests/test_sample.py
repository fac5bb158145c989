"""Tests for the synthetic ILSVRC-2012-shaped sample (pipeline/data/sample*.py)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import ParamsError, SampleParams, load_params, parse_section
from pipeline.data import ilsvrc, sample
from pipeline.data.cifar import CIFAR_DIR, ingest_cifar10
from pipeline.data.sample import design_name, generate_sample, load_synsets, select_classes
from pipeline.data.sample_render import render
from pipeline.data.sample_shapes import DESIGNS
from tests.conftest import ROOT

TINY = SampleParams(num_classes=3, train_per_class=6, val_per_class=2)
SMALL = SampleParams(num_classes=2, train_per_class=2, val_per_class=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 3-class tree (18 train, 6 val images) shared by the read-only tests."""
    root = tmp_path_factory.mktemp("tiny") / "sample"
    return root, generate_sample(root, TINY)


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _quirks(root: Path) -> dict[str, list[str]]:
    """Sorts every image by what PIL finds in it (not by its name)."""
    found: dict[str, list[str]] = {"png": [], "cmyk": [], "grey": [], "rgb": [], "progressive": []}
    for path in sorted(root.rglob("*.JPEG")):
        relative = path.relative_to(root).as_posix()
        with Image.open(path) as image:
            image.convert("RGB").load()  # every file decodes fully
            if image.format == "PNG":
                found["png"].append(relative)
                continue
            assert image.format == "JPEG"
            found[{"CMYK": "cmyk", "L": "grey", "RGB": "rgb"}[image.mode]].append(relative)
            if image.info.get("progressive") or image.info.get("progression"):
                found["progressive"].append(relative)
    return found


def test_packaged_synsets_are_the_ilsvrc2012_list() -> None:
    synsets = load_synsets()
    wnids = [wnid for wnid, _ in synsets]
    assert len(synsets) == 1000
    assert wnids == sorted(set(wnids))
    assert all(re.fullmatch(r"n\d{8}", wnid) and names.strip() for wnid, names in synsets)
    assert synsets[0] == ("n01440764", "tench, Tinca tinca")
    assert synsets[-1] == ("n15075141", "toilet tissue, toilet paper, bathroom tissue")
    # The real list's known oddities: two synsets named "crane", two "maillot".
    names = dict(synsets)
    assert names["n02012849"] == names["n03126707"] == "crane"
    assert (names["n03710637"], names["n03710721"]) == ("maillot", "maillot, tank suit")


def test_load_synsets_rejects_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "LOC_synset_mapping.txt"
    path.write_text("n01440764 tench, Tinca tinca\nn0144 goldfish\n")
    with pytest.raises(ValueError, match=r":2: expected 'n<8 digits> <names>'"):
        load_synsets(path)


def test_classes_are_spread_evenly_over_the_1000() -> None:
    synsets = load_synsets()
    assert select_classes(10) == [synsets[i] for i in range(0, 1000, 100)]
    assert select_classes(2) == [synsets[0], synsets[500]]
    assert select_classes(1000) == synsets


def test_designs_are_distinct_and_the_first_ten_curated() -> None:
    names = [design_name(rank) for rank in range(1000)]
    assert len(set(names)) == 1000
    assert names[:10] == [
        "disc/solid/plain",
        "disc/outline/plain",
        "square/solid/plain",
        "triangle/solid/plain",
        "star/solid/plain",
        "plus/solid/plain",
        "square/stripes/plain",
        "square/checker/plain",
        "disc/dots/plain",
        "crescent/solid/plain",
    ]


def test_every_design_draws_a_visible_object_inside_the_picture() -> None:
    # All 1000 designs at the smallest picture size (200x150); through the private
    # renderer, since a 1000-class tree would take ~20 s.
    for rank, design in enumerate(DESIGNS):
        image, boxes = render(np.random.default_rng(rank), design, (200, 150))
        assert image.size == (200, 150) and image.mode == "RGB"
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 < 200 and 0 <= y0 < y1 < 150, (design, boxes)
            assert max(x1 - x0, y1 - y0) >= 15, (design, boxes)


def test_tree_has_the_ilsvrc2012_layout(tiny: tuple[Path, dict]) -> None:
    root, summary = tiny
    assert sorted(p.name for p in root.iterdir()) == [
        "LOC_synset_mapping.txt",
        "LOC_val_solution.csv",
        "train",
        "val",
    ]
    assert [p.name for p in root.parent.iterdir()] == ["sample"]  # no temporary left over
    classes = summary["classes"]
    assert classes == [wnid for wnid, _ in select_classes(3)]
    assert sorted(p.name for p in (root / "train").iterdir()) == classes
    for wnid in classes:
        names = [p.name for p in (root / "train" / wnid).iterdir()]
        assert len(names) == 6
        assert all(re.fullmatch(rf"{wnid}_[1-9]\d*\.JPEG", name) for name in names), names
    val = sorted(p.name for p in (root / "val").iterdir())
    assert val == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 7)]
    assert (summary["num_classes"], summary["train_images"], summary["val_images"]) == (3, 18, 6)
    assert summary["designs"] == [design_name(rank) for rank in range(3)]


def test_mapping_and_val_solution_match_the_files(tiny: tuple[Path, dict]) -> None:
    root, summary = tiny
    assert load_synsets(root / "LOC_synset_mapping.txt") == select_classes(3)
    with open(root / "LOC_val_solution.csv", newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["ImageId", "PredictionString"]
    labels = {}
    for image_id, prediction in rows:
        tokens = prediction.split(" ")
        assert len(tokens) % 5 == 0, prediction
        with Image.open(root / "val" / f"{image_id}.JPEG") as image:
            width, height = image.size
        for i in range(0, len(tokens), 5):
            wnid, (x0, y0, x1, y1) = tokens[i], map(int, tokens[i + 1 : i + 5])
            assert wnid == tokens[0]
            assert 0 <= x0 < x1 < width and 0 <= y0 < y1 < height
            assert max(x1 - x0, y1 - y0) >= 0.2 * min(width, height)  # the object, not a speck
        labels[image_id] = tokens[0]
    assert sorted(labels) == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 7)]
    assert Counter(labels.values()) == {wnid: 2 for wnid in summary["classes"]}


def test_image_sizes_mix_like_imagenet(tiny: tuple[Path, dict]) -> None:
    root, _ = tiny
    sizes = []
    for path in root.rglob("*.JPEG"):
        with Image.open(path) as image:
            sizes.append(image.size)
    assert sum(max(size) == 500 for size in sizes) >= len(sizes) // 2
    assert any(max(size) <= 300 for size in sizes)
    assert any(max(size) > 1000 for size in sizes)
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_tree_holds_the_real_sets_file_quirks(tiny: tuple[Path, dict]) -> None:
    root, summary = tiny
    found = _quirks(root)
    assert found["png"] and found["cmyk"] and found["grey"] and found["progressive"]
    assert all(path.startswith("train/") for path in found["png"] + found["cmyk"])
    quirks = summary["quirks"]
    assert (quirks["png_as_jpeg"], quirks["cmyk"]) == (found["png"], found["cmyk"])
    assert (quirks["greyscale"], quirks["progressive"]) == (
        len(found["grey"]),
        len(found["progressive"]),
    )


def test_smallest_set_still_holds_every_quirk(tmp_path: Path) -> None:
    generate_sample(tmp_path / "s", dataclasses.replace(SMALL, train_per_class=5))
    found = _quirks(tmp_path / "s")
    assert found["png"] and found["cmyk"] and found["grey"] and found["progressive"]


def test_same_parameters_give_identical_bytes(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny
    generate_sample(tmp_path / "again", TINY)
    assert _digest(tmp_path / "again") == _digest(root)


def test_another_seed_gives_other_images(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny
    generate_sample(tmp_path / "other", dataclasses.replace(TINY, seed=1))
    first, second = _digest(root), _digest(tmp_path / "other")
    images = {k: v for k, v in first.items() if k.endswith(".JPEG")}
    other_images = {k: v for k, v in second.items() if k.endswith(".JPEG")}
    assert len(other_images) == len(images)
    assert not set(images.values()) & set(other_images.values())
    assert first["LOC_val_solution.csv"] != second["LOC_val_solution.csv"]


def test_existing_tree_is_replaced(tmp_path: Path) -> None:
    root = tmp_path / "data" / "sample"  # missing parents are created
    generate_sample(root, TINY)
    (root / "stray.txt").write_text("left from before")
    generate_sample(root, SMALL)
    assert not (root / "stray.txt").exists()
    assert len(list((root / "train").iterdir())) == 2
    assert [p.name for p in root.parent.iterdir()] == ["sample"]


def test_interrupted_run_keeps_the_previous_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "sample"
    generate_sample(root, SMALL)
    before = _digest(root)
    calls = []
    save = sample._save

    def failing_save(*args: object) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        save(*args)

    monkeypatch.setattr(sample, "_save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        generate_sample(root, dataclasses.replace(SMALL, seed=7))
    assert _digest(root) == before
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        generate_sample(tmp_path / "fresh", SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_classes", 1),
        ("num_classes", 1001),
        ("num_classes", 2.0),
        ("num_classes", True),
        ("train_per_class", 1),
        ("train_per_class", 1301),
        ("val_per_class", 0),
        ("val_per_class", 51),
        ("seed", -1),
        ("seed", "0"),
    ],
)
def test_bad_parameters_are_rejected(tmp_path: Path, name: str, value: object) -> None:
    # The section checks itself when built, so a bad one never reaches the generator.
    with pytest.raises(ParamsError, match=rf"^sample\.{name}={re.escape(repr(value))}: expected int"):
        generate_sample(tmp_path / "s", dataclasses.replace(TINY, **{name: value}))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("num_classes", 2, ilsvrc.NUM_SYNSETS),
        ("train_per_class", 2, ilsvrc.MAX_TRAIN_PER_CLASS),
        ("val_per_class", 1, ilsvrc.MAX_VAL_PER_CLASS),
    ],
)
def test_params_file_allows_exactly_the_generators_range(name: str, low: int, high: int) -> None:
    # params.yaml is validated before the stage starts: its limits must be the generator's.
    assert getattr(parse_section("sample", {name: low}, SampleParams), name) == low
    assert getattr(parse_section("sample", {name: high}, SampleParams), name) == high
    for value in (low - 1, high + 1):
        with pytest.raises(ParamsError, match=rf"^sample\.{name}={value}: "):
            parse_section("sample", {name: value}, SampleParams)


def test_cifar_layout_is_what_the_cifar_reader_reads(tmp_path: Path) -> None:
    """sample.layout cifar10: CIFAR-10's python batches, read by the shard stage's own reader,
    every class in every split, each image its class's design (not a blank or a copy)."""
    params = dataclasses.replace(TINY, layout="cifar10", train_per_class=10)
    summary = generate_sample(tmp_path / "a", params)
    names = ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    assert summary["files"] == sorted(f"{CIFAR_DIR}/{n}" for n in names)
    assert sorted(p.name for p in (tmp_path / "a" / CIFAR_DIR).iterdir()) == sorted(names)
    catalog = ingest_cifar10(str(tmp_path / "a"))
    assert (
        catalog.classes
        == summary["classes"]
        == ["disc-solid-plain", "disc-outline-plain", "square-solid-plain"]
    )
    train = [r for r in catalog.records if r.split == "train"]
    val = [r for r in catalog.records if r.split == "val"]
    assert Counter(r.label for r in train) == {0: 10, 1: 10, 2: 10}
    assert Counter(r.label for r in val) == {0: 2, 1: 2, 2: 2}
    assert len({r.path.split("#")[0] for r in train}) == 5, "the train images are dealt over five batches"
    assert [r.label for r in train] != sorted(r.label for r in train), "classes mixed within the batches"
    pixels = np.stack([r.pixels for r in train])
    assert pixels.shape == (30, 32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.std(axis=(1, 2, 3)).min() > 10 and len({p.tobytes() for p in pixels}) == 30
    # A solid disc's centre differs from its outline's: the average image per class tells them apart.
    means = [pixels[[r.label == k for r in train]].mean(0) for k in range(3)]
    assert min(np.abs(means[a] - means[b]).mean() for a, b in ((0, 1), (0, 2), (1, 2))) > 2
    generate_sample(tmp_path / "b", params)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_cifar_layout_needs_the_cifar_source(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample"]["layout"] = "cifar10"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    expected = r"^shard\.source='imagenet': expected 'cifar10' for sample\.layout='cifar10'"
    with pytest.raises(ParamsError, match=expected):
        load_params(tmp_path / "params.yaml")
