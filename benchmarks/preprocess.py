"""Benchmark of the shard stage against a naive loop and a no-framework floor.

Builds (once, cached in --workdir) an ILSVRC-shaped tree of JPEGs cut from the colour
photographs bundled with scikit-image, at ImageNet's size mix, then measures on the
same files:

- stage: `write_shards(fmt="both")` on Ray with all cores, as the stage runs;
- naive: one process, PIL open + convert RGB, torchvision Resize(256) + CenterCrop(256),
  save JPEG q90 per file;
- the stage's per-image function in the same one-process loop (separates the gain of
  the function from the gain of parallelism);
- floor: the stage's own per-image function in a ProcessPoolExecutor, no framework,
  no shard writing.

No rate includes starting processes or importing torch (a fixed cost per process): the
baseline's clock starts in its process after the imports, the floor's once its pool is
up, the stage's once `warm_workers` has returned, as the stage hides that cost behind
listing the input tree.

Then runs the stage again (untimed) for its peak RSS, sampled every 50 ms: driver +
Ray worker processes, and "all" (plus GCS, raylet, agents); torch, which the resize
uses, is most of each process's footprint. With --scale, runs it once more
on 4x the images (the corpus listed four times under distinct keys) and prints both
peaks and their ratio. The last line is always
`preprocess_speedup: X` (stage images/s / naive images/s).

Usage: .venv/bin/python benchmarks/preprocess.py [--images 5000] [--scale]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import ray
from PIL import Image
from skimage import data as skdata

from pipeline.cluster import start_local_ray
from pipeline.config import ShardParams
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.preprocess import DEFAULT_QUALITY, DEFAULT_SIZE, preprocess_image
from pipeline.data.records import Record
from pipeline.data.shard_writer import warm_workers, write_shards
from pipeline.storage import read_bytes

PHOTOS = (  # colour photographs bundled in the scikit-image wheel (no download)
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "stereo_motorcycle",
)  # fmt: skip
# (width, height) choices and their probabilities: mostly ImageNet's typical Flickr
# sizes, some small, some with a side over 1000 px (1000-2000).
TYPICAL = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (500, 400))
P_SMALL, P_LARGE = 0.10, 0.06
P_GREY = 0.02
# Luma grain (std, grey levels): crops of the bundled photos upscaled to 500 px are
# smoother than real photos, so their JPEGs are smaller and cheaper to decode than
# ILSVRC-2012's; grain brings their size and decode cost closer (README, benchmarks).
GRAIN = 8.0
N_CLASSES = 20
VAL_FRACTION = 0.1
SCALE_FACTOR = 4
SAMPLE_S = 0.05


def _photos() -> list[np.ndarray]:
    """The source photographs as (H, W, 3) uint8."""
    out = []
    for name in PHOTOS:
        img = getattr(skdata, name)()
        out.append(img[0] if isinstance(img, tuple) else img)  # stereo pairs: left view
    return out


def _draw_size(rng: np.random.Generator) -> tuple[int, int]:
    u = rng.random()
    if u < P_SMALL:
        long, short = int(rng.integers(200, 400)), int(rng.integers(120, 300))
    elif u < P_SMALL + P_LARGE:
        long = int(rng.integers(1000, 2001))
        short = int(long * rng.uniform(0.6, 0.8))
    else:
        return TYPICAL[int(rng.integers(len(TYPICAL)))]
    return (long, short) if rng.random() < 0.7 else (short, long)


def _make_image(photo: np.ndarray, rng: np.random.Generator) -> bytes:
    """A random crop of `photo` at a drawn ImageNet size, with grain, as JPEG q 75-95."""
    w, h = _draw_size(rng)
    ph, pw = photo.shape[:2]
    cw = int(min(pw, ph * w / h) * rng.uniform(0.5, 1.0))  # crop with the target aspect
    ch = int(cw * h / w)
    x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    img = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((w, h), Image.Resampling.BICUBIC)
    grain = rng.normal(0, GRAIN, (h, w, 1))  # same on R, G, B: survives chroma subsampling
    img = Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))
    if rng.random() < P_GREY:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def build_corpus(root: Path, n_images: int, seed: int) -> Path:
    """Writes (or reuses) root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG."""
    manifest = root / "corpus.json"
    wanted = {"images": n_images, "seed": seed, "version": 2}
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    photos = _photos()
    n_val = int(n_images * VAL_FRACTION)
    for i in range(n_images):
        split = "val" if i < n_val else "train"
        wnid = f"n{int(rng.integers(N_CLASSES)):08d}"
        name = f"ILSVRC2012_val_{i + 1:08d}" if split == "val" else f"{wnid}_{i}"
        folder = root / split / wnid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.JPEG").write_bytes(_make_image(photos[i % len(photos)], rng))
    manifest.write_text(json.dumps(wanted))  # last: a partial corpus is rebuilt
    return root


def naive(paths: list[str], out: str) -> float:
    """The baseline: one process, torchvision transforms, one output file per image.

    Runs in its own spawned process (see main), so torch never loads into the stage's
    driver; returns its own elapsed seconds, excluding that process's start.
    """
    from torchvision import transforms  # here: only the baseline's process pays for torch

    tf = transforms.Compose([transforms.Resize(DEFAULT_SIZE), transforms.CenterCrop(DEFAULT_SIZE)])
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    for i, path in enumerate(paths):
        img = tf(Image.open(path).convert("RGB"))
        img.save(f"{out}/{i}.jpg", "JPEG", quality=DEFAULT_QUALITY)
    return time.perf_counter() - start


def serial(paths: list[str], out: str) -> float:
    """The stage's per-image function with the baseline's loop and I/O; returns seconds."""
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    for i, path in enumerate(paths):
        with open(f"{out}/{i}.jpg", "wb") as f:
            f.write(preprocess_image(read_bytes(path)).jpeg)
    return time.perf_counter() - start


def _floor_one(path: str) -> int:
    return len(preprocess_image(read_bytes(path)).jpeg)


def _one_thread() -> None:
    """Pool initializer: one torch thread per process, as Ray gives a 1-CPU task."""
    import torch

    torch.set_num_threads(1)


def floor(paths: list[str], workers: int) -> float:
    """The stage's per-image function over all cores, no framework, nothing written.

    Timed from when the processes are up with torch imported, like the stage's warmed
    Ray workers. Spawned, not forked: this process has run torch's OpenMP threads (in
    `serial`), and a forked child of such a process hangs in its first parallel region.
    """
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_one_thread) as pool:
        list(pool.map(abs, range(workers)))  # processes started, torch imported
        start = time.perf_counter()
        list(pool.map(_floor_one, paths, chunksize=64))
        return time.perf_counter() - start


def in_fresh_process(fn: Callable[..., float], *args: object) -> float:
    """Runs fn(*args) in a spawned process (clean imports) and returns its result."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _is_counted(proc: psutil.Process) -> bool:
    """Ray worker processes ("ray::IDLE", "ray::<task>"), not Ray's agents/daemons."""
    name = proc.name()
    return name.startswith("ray::") and not name.endswith("Agent")


class PeakRss:
    """Samples RSS every SAMPLE_S: driver + Ray workers, and all Ray processes."""

    def __init__(self) -> None:
        self.peak_workers = 0  # driver + worker processes
        self.peak_all = 0  # driver + every descendant (GCS, raylet, agents too)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            workers = total = me.memory_info().rss
            for p in me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    total += rss
                    workers += rss if _is_counted(p) else 0
                except psutil.Error:  # exited between listing and reading
                    pass
            self.peak_workers = max(self.peak_workers, workers)
            self.peak_all = max(self.peak_all, total)
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(label: str, n: int, seconds: float, rates: dict[str, float]) -> None:
    """Records and prints images/s, with the load average (other users share the cores)."""
    rates[label] = n / seconds
    print(f"{label}: {rates[label]:.1f} images/s ({n} images, load avg after: {_load()})", flush=True)


def _settings(shard_size: int) -> ShardParams:
    """The stage's shard params at this benchmark's shard size (both formats, as the stage)."""
    return ShardParams(size=DEFAULT_SIZE, format="both", shard_size=shard_size)


def stage_run(records: list[Record], out: Path, classes: list[str], shard_size: int) -> float:
    """Runs write_shards as the stage does; returns its seconds.

    The stage warms Ray's workers (`warm_workers`) while it lists the input tree; here
    that happens before the clock starts.
    """
    ray.get(warm_workers())
    start = time.perf_counter()
    write_shards(records, out, classes=classes, settings=_settings(shard_size), progress=False)
    return time.perf_counter() - start


def stage_peak_rss(records: list[Record], out: Path, classes: list[str], shard_size: int) -> PeakRss:
    """Runs write_shards again under the RSS sampler (apart from the timed run: sampling
    every process every SAMPLE_S takes CPU time from the stage)."""
    with PeakRss() as rss:
        write_shards(records, out, classes=classes, settings=_settings(shard_size), progress=False)
    return rss


def repeat(records: list[Record], times: int) -> list[Record]:
    """The records `times` over, each copy under distinct keys."""
    return [dataclasses.replace(r, key=f"{r.key}_x{t}") for t in range(times) for r in records]


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="corpus size")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/alexnet-preprocess-bench"))
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="cores to use")
    ap.add_argument(
        "--shard-size", type=int, default=250,
        help="images per shard; smaller than the stage default so a 5k corpus still "
        "gives every core many shards (no idle tail)",
    )  # fmt: skip
    ap.add_argument("--scale", action="store_true", help=f"also run {SCALE_FACTOR}x images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(f"load avg before: {_load()}", flush=True)
    t0 = time.perf_counter()
    corpus = build_corpus(args.workdir / "corpus", args.images, args.seed)
    catalog = ingest_imagenet(str(corpus))
    records = catalog.records
    paths = [r.path for r in records]
    sizes = [Image.open(p).size for p in paths]
    print(
        f"corpus: {len(paths)} images, mean {np.mean([w * h for w, h in sizes]) / 1e6:.3f} Mpixel, "
        f"{np.mean([os.path.getsize(p) for p in paths]) / 1e3:.0f} KB, "
        f"{np.mean([max(wh) > 1000 for wh in sizes]):.1%} over 1000 px "
        f"(ready in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    rates: dict[str, float] = {}
    scratch = str(args.workdir / "scratch")
    report("naive", len(paths), in_fresh_process(naive, paths, scratch), rates)
    report("per-image function, 1 process", len(paths), serial(paths, scratch), rates)
    shutil.rmtree(scratch)
    report(f"floor ({args.workers} processes)", len(paths), floor(paths, args.workers), rates)
    floor_rate = rates[f"floor ({args.workers} processes)"]

    start_local_ray(num_cpus=args.workers, quiet=True)
    out = args.workdir / "shards"
    report("stage", len(records), stage_run(records, out, catalog.classes, args.shard_size), rates)
    print(f"stage / floor: {rates['stage'] / floor_rate:.0%}")
    rss = stage_peak_rss(records, out, catalog.classes, args.shard_size)
    print(f"stage peak RSS: driver + workers {mib(rss.peak_workers)}, all {mib(rss.peak_all)}")
    if args.scale:
        big = repeat(records, SCALE_FACTOR)
        rss_big = stage_peak_rss(big, out, catalog.classes, args.shard_size)
        for what, small, large in (
            ("driver + workers", rss.peak_workers, rss_big.peak_workers),
            ("all Ray processes", rss.peak_all, rss_big.peak_all),
        ):
            print(
                f"peak RSS {what}: {mib(small)} at {len(records)} images, "
                f"{mib(large)} at {len(big)}: ratio {large / small:.3f}"
            )
    ray.shutdown()
    shutil.rmtree(out)
    print(f"preprocess_speedup: {rates['stage'] / rates['naive']:.2f}")


if __name__ == "__main__":
    main()
