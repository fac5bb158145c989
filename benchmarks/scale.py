"""1,000-class scale rehearsal: the real stages on an ILSVRC-shaped set of N and 5N images.

Generates, for each size, the official archives (`pipeline.data.sample_archives`'s
writer: ILSVRC2012_img_train.tar of 1,000 per-class tars, ILSVRC2012_img_val.tar, the
devkit) over all 1,000 real synsets (pipeline/data/LOC_synset_mapping.txt), with train
and val per class in ImageNet's proportion (1,281,167 : 50,000, at least one val image per
class): N = 20,000 gives 19 train + 1 val per class, 5N 96 + 4. The images are small
(192 x 144 JPEGs, cut from one picture of the class's sample design per class, each
shifted, flipped and brightened differently), so 5N runs in minutes on 2 cores; the
stages store them at the sample profile's 128 px.

Then, in a workspace of its own per size (params.yaml: the sample profile with one
training epoch, no warmup, 1,000 outputs from the shards' classes), it runs what `dvc
repro` runs, each stage a `python -m stages.X` driver starting its own local Ray:
shard (which ingests the archives first), stats, train, evaluate; and, before them,
ingestion alone (`ingest_imagenet`, the shard stage's first step) to show its share.
Per stage it prints the wall time per image at both sizes (each stage's own image
count: shard all inputs, stats the train images, train one epoch's train and val
images, evaluate the val images) with the 5N/N ratio, the driver's peak RSS at both
sizes (`ru_maxrss` of the driver process itself, read at its exit: Ray's own processes
and workers not included) with its ratio, and the fixed and per-image parts that the two
sizes give (time = fixed + per_image x images). From those, the time the same stages
would take on ImageNet's 1,281,167 + 50,000 images here, with the sample-profile network.

Ingestion alone is the index and little else, so its driver's growth from N to 5N gives
the index's bytes per image. The last two lines are `scale_memory_ratio: X` (the largest
5N/N ratio of driver peak RSS among the stages `dvc repro` runs: shard, stats, train,
evaluate) and `scale_time_per_image_ratio: X` (those stages' wall time per image, 5N over
N; at most 1.0 when every stage is linear, since fixed start-up costs spread over more
images).

Usage: .venv/bin/python benchmarks/scale.py [--n 20000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.stage_process import run_stage_process  # noqa: E402
from pipeline.data.ilsvrc import NUM_SYNSETS  # noqa: E402
from pipeline.data.sample import MAPPING_FILE, SOLUTION_FILE, load_synsets  # noqa: E402
from pipeline.data.sample_archives import pack_sample  # noqa: E402
from pipeline.data.sample_render import render  # noqa: E402
from pipeline.data.sample_shapes import DESIGNS  # noqa: E402

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
FACTOR = 5
WIDTH, HEIGHT = 192, 144  # each stored image; the stages resize it to shard.size
BASE = (WIDTH + 64, HEIGHT + 48)  # the class picture the images are cut from
STAGES = ("ingest", "shard", "stats", "train", "evaluate")
PIPELINE = STAGES[1:]  # what dvc repro runs: the shard stage ingests first
# The driver process: runs argv[2] (Python source), then writes its own peak RSS (KiB)
# to argv[1], also when the stage exits with an error.
DRIVER = """
import resource, sys
try:
    exec(sys.argv[2])
finally:
    with open(sys.argv[1], "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""
STAGE = "import runpy; runpy.run_module('stages.{stage}', run_name='__main__')"  # as python -m does
INGEST = """
from pipeline.data.imagenet import ingest_imagenet
catalog = ingest_imagenet("data/raw")
print(f"ingest: {len(catalog.records)} records, {len(catalog.quarantine)} quarantined")
"""


def split_per_class(n: int) -> tuple[int, int]:
    """(train, val) images per class for `n` images over the 1,000 classes, ImageNet's ratio."""
    per_class = n // NUM_SYNSETS
    val = max(1, round(per_class * IMAGENET_VAL / (IMAGENET_TRAIN + IMAGENET_VAL)))
    return per_class - val, val


def _write_class(tree: Path, rank: int, wnid: str, train: int, val_numbers: list[int]) -> None:
    """Process-pool task: one class's train images and its val images (by val number)."""
    rng = np.random.default_rng(np.random.SeedSequence([0, rank]))
    base = np.asarray(render(rng, DESIGNS[rank], BASE)[0].convert("RGB"), dtype=np.int16)
    folder = tree / "train" / wnid
    folder.mkdir(parents=True)
    paths = [folder / f"{wnid}_{7 * i + 1}.JPEG" for i in range(train)]
    paths += [tree / "val" / f"ILSVRC2012_val_{number:08d}.JPEG" for number in val_numbers]
    for path in paths:
        top, left = int(rng.integers(0, BASE[1] - HEIGHT + 1)), int(rng.integers(0, BASE[0] - WIDTH + 1))
        pixels = base[top : top + HEIGHT, left : left + WIDTH] + int(rng.integers(-24, 25))
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def generate(raw: Path, n: int) -> None:
    """The official archives of an `n`-image, 1,000-class set in `raw` (module docstring)."""
    train, val = split_per_class(n)
    synsets = load_synsets()
    tree = raw.with_name(f"{raw.name}-tree")
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "val").mkdir(parents=True)
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(len(synsets)), val))  # val order
    numbers: list[list[int]] = [[] for _ in synsets]
    for number, rank in enumerate(labels.tolist(), start=1):
        numbers[rank].append(number)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        jobs = [pool.submit(_write_class, tree, r, w, train, numbers[r]) for r, (w, _) in enumerate(synsets)]
        for job in jobs:
            job.result()
    shutil.copy(ROOT / "pipeline/data" / MAPPING_FILE, tree / MAPPING_FILE)
    rows = [
        f"ILSVRC2012_val_{i:08d},{synsets[r][0]} 0 0 {WIDTH - 1} {HEIGHT - 1}"
        for i, r in enumerate(labels, 1)
    ]
    (tree / SOLUTION_FILE).write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    pack_sample(tree, raw, "archives", seed=0)
    shutil.rmtree(tree)


def write_params(ws: Path) -> None:
    """The sample profile reading data/raw, one training epoch without warmup."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["raw"] = "data/raw"
    params["train"].update(epochs=1, warmup_epochs=0)
    params["mlflow"]["system_metrics"] = False
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@dataclass(frozen=True)
class Run:
    """One stage at one size: wall seconds, images handled, driver peak RSS in MiB."""

    seconds: float
    images: int
    rss_mib: float


def run_stage(ws: Path, stage: str) -> tuple[float, float]:
    """Runs `stage` in `ws` as its own driver process; (wall seconds, driver peak RSS MiB).
    Exits with the stage's output when it fails."""
    source = INGEST if stage == "ingest" else STAGE.format(stage=stage)
    rss_file = ws / f".rss-{stage}"
    seconds, stdout = run_stage_process([sys.executable, "-c", DRIVER, str(rss_file), source], ws, stage)
    print(f"  {stage}: {seconds:.1f} s  {stdout.strip().splitlines()[-1]}", flush=True)
    return seconds, int(rss_file.read_text()) / 1024


def stage_images(ws: Path) -> dict[str, int]:
    """Images each stage handled, from the stages' own outputs."""
    counts = json.loads((ws / "data/shards/meta.json").read_text())["counts"]
    inputs = sum(json.loads((ws / "metrics/shard.json").read_text())["inputs"].values())
    return {
        "ingest": inputs,
        "shard": inputs,
        "stats": json.loads((ws / "data/stats.json").read_text())["num_images"],
        "train": counts["train"] + counts["val"],
        "evaluate": json.loads((ws / "metrics/eval.json").read_text())["num_images"],
    }


def measure(ws: Path, n: int) -> dict[str, Run]:
    """Generates the n-image set in `ws` and runs every stage there."""
    ws.mkdir(parents=True)
    write_params(ws)
    began = time.perf_counter()
    generate(ws / "data/raw", n)
    size = sum(f.stat().st_size for f in (ws / "data/raw").iterdir()) / 2**20
    took = time.perf_counter() - began
    print(f"{n} images: archives of {size:.0f} MiB generated in {took:.0f} s", flush=True)
    timed = {stage: run_stage(ws, stage) for stage in STAGES}
    images = stage_images(ws)
    rate = json.loads((ws / "metrics/shard.json").read_text())["images_per_s"]
    print(f"  shard tasks: {rate:.0f} images/s", flush=True)
    shutil.rmtree(ws / "data/raw")  # 5N's archives need the disk more
    return {stage: Run(seconds, images[stage], rss) for stage, (seconds, rss) in timed.items()}


REAL = {  # images each stage handles on ImageNet (train: one epoch and its validation)
    "ingest": IMAGENET_TRAIN + IMAGENET_VAL, "shard": IMAGENET_TRAIN + IMAGENET_VAL, "stats": IMAGENET_TRAIN,
    "train": IMAGENET_TRAIN + IMAGENET_VAL, "evaluate": IMAGENET_VAL,
}  # fmt: skip


def report(small: dict[str, Run], large: dict[str, Run]) -> dict[str, tuple[float, float]]:
    """Prints the per-stage table; returns {stage: (fixed s, per-image s)} from the two sizes."""
    print(f"\n{'stage':<9} {'images N / 5N':>16} {'ms/image N / 5N':>16} {'ratio':>6} "
          f"{'driver MiB N / 5N':>18} {'ratio':>6} {'fixed s':>8} {'ms/image':>9}")  # fmt: skip
    fits = {}
    for stage in STAGES:
        a, b = small[stage], large[stage]
        per = [r.seconds / r.images * 1000 for r in (a, b)]
        # s per added image (stages whose image count did not grow: their mean)
        marginal = (
            (b.seconds - a.seconds) / (b.images - a.images) if b.images > a.images else b.seconds / b.images
        )
        fits[stage] = (a.seconds - marginal * a.images, marginal)
        print(f"{stage:<9} {a.images:>7} / {b.images:>6} {per[0]:>7.2f} / {per[1]:>6.2f} "
              f"{per[1] / per[0]:>6.3f} {a.rss_mib:>9.0f} / {b.rss_mib:>6.0f} {b.rss_mib / a.rss_mib:>6.3f} "
              f"{fits[stage][0]:>8.1f} {marginal * 1000:>9.3f}")  # fmt: skip
    return fits


def project(fits: dict[str, tuple[float, float]], large: dict[str, Run]) -> None:
    """Prints the time of each stage on ImageNet: its fixed part plus its per-image part
    times ImageNet's images (where load made the per-image part come out <= 0, 5N's time
    per image instead), and as an upper bound 5N's time per image times ImageNet's images
    (5N's time still carries the fixed part); then the pipeline on this machine's cores
    and, the per-image parts divided among them, on 2, 4 and 6 more."""
    cores = os.cpu_count() or 1
    print(f"\nImageNet (1,281,167 train + 50,000 val), these stages, sample-profile network, {cores} cores:")
    parts = {}
    for stage in STAGES:
        fixed, per_image = fits[stage]
        bound = large[stage].seconds / large[stage].images * REAL[stage]
        parts[stage] = (max(fixed, 0), per_image * REAL[stage]) if per_image > 0 else (0.0, bound)
        print(f"  {stage:<9} {sum(parts[stage]) / 3600:6.2f} h   (upper bound {bound / 3600:.2f} h)")
    fixed = sum(parts[s][0] for s in PIPELINE)
    variable = sum(parts[s][1] for s in PIPELINE)
    more = ", ".join(
        f"{cores + k} cores {(fixed + variable * cores / (cores + k)) / 3600:.2f} h" for k in (2, 4, 6)
    )
    print(f"  shard + stats + one epoch + evaluate: {(fixed + variable) / 3600:.2f} h; "
          f"per-image parts spread over more cores: {more}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help=f"images of the small set; the large has {FACTOR}x")
    ap.add_argument("--workdir", type=Path, help="where the workspaces go (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.n < 2 * NUM_SYNSETS:
        ap.error(f"--n={args.n}: expected >= {2 * NUM_SYNSETS} (one train and one val image per class)")
    print(f"load avg before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scale-", dir=args.workdir) as tmp:
        small = measure(Path(tmp, "small"), args.n)
        large = measure(Path(tmp, "large"), FACTOR * args.n)
    print(f"load avg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    project(report(small, large), large)
    a, b = small["ingest"], large["ingest"]
    index = (b.rss_mib - a.rss_mib) * 2**20 / (b.images - a.images)
    print(f"the index (ingestion's driver, growth with N): {index:.0f} bytes per image")
    per_image = [sum(r[s].seconds for s in PIPELINE) / r["shard"].images for r in (small, large)]
    print(f"scale_memory_ratio: {max(large[s].rss_mib / small[s].rss_mib for s in PIPELINE):.3f}")
    print(f"scale_time_per_image_ratio: {per_image[1] / per_image[0]:.3f}")


if __name__ == "__main__":
    main()
