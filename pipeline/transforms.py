"""The paper's data augmentation and evaluation crops, defined once for training and evaluation.

Training (Krizhevsky et al. 2012, section 4.1): a random `crop` x `crop` patch of the
stored `size` x `size` image, a horizontal flip with probability 1/2, and "fancy PCA"
lighting: add eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, pca_std) drawn once
per image per use. Then per-channel mean/std normalisation (pixels scaled to [0, 1]).

Evaluation: the centre crop, or the paper's ten crops (four corners and centre, and their
reflections), whose softmax outputs the caller averages.

JPEG decoding runs in a thread pool: libjpeg-turbo (through simplejpeg) and torch release
the GIL, so threads use every core without copying images between processes.
"""

from __future__ import annotations

import json
import math
import mmap
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.preprocess import decode_jpeg

_SERIAL_VALUES = 32768  # torch's at::internal::GRAIN_SIZE: smaller ops run on the calling thread


@dataclass(frozen=True)
class ColorStats:
    """Training-set colour statistics, pixels in [0, 1] (the stats stage's JSON)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eigval: tuple[float, float, float]  # descending
    eigvec: tuple[tuple[float, ...], ...]  # eigvec[i][j]: component i of eigenvector j

    @classmethod
    def load(cls, path: str | Path) -> ColorStats:
        """Reads the stats stage's JSON file.

        Raises:
            ValueError: When a key is missing or has the wrong shape.
        """
        raw = json.loads(Path(path).read_text())
        try:
            stats = cls(
                mean=tuple(float(v) for v in raw["mean"]),
                std=tuple(float(v) for v in raw["std"]),
                eigval=tuple(float(v) for v in raw["eigval"]),
                eigvec=tuple(tuple(float(v) for v in row) for row in raw["eigvec"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected keys mean, std, eigval, eigvec ({e})") from e
        if len(stats.mean) != 3 or len(stats.std) != 3 or len(stats.eigval) != 3 or len(stats.eigvec) != 3:
            raise ValueError(f"{path}: mean, std, eigval must have 3 values and eigvec 3x3")
        return stats


def _empty_float32(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor in memory backed by transparent huge pages.

    A training batch (128 x 224 x 224 x 3 float32: 77 MB) is above glibc's 32 MB mmap
    ceiling, so every batch is fresh memory, and writing it took ~19,000 4 KiB page
    faults: 0.15 ms per image, a third of the augmentation's time on 2 cores. With
    huge pages that is ~40 faults (benchmarks/input_pipeline.py: floor 2,583 -> 3,289
    images/s, ours 2,021 -> 2,703). Where madvise(MADV_HUGEPAGE) is unavailable this is
    torch.empty.
    """
    nbytes = 4 * math.prod(shape)
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes == 0:
        return torch.empty(shape, dtype=torch.float32)
    # Private: an anonymous MAP_SHARED mapping (mmap's default) is shmem, which gets no THP.
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # unmapped when the tensor dies
    buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.float32).view(shape)  # keeps buf alive


def _normalize(crops: torch.Tensor, stats: ColorStats, shift: torch.Tensor | None) -> torch.Tensor:
    """(B, 3, h, w) uint8 -> (B, 3, h, w) float32, lighting-shifted and normalised."""
    x = crops.float().div_(255.0)  # [0, 1]
    mean = torch.tensor(stats.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(stats.std, device=x.device).view(1, 3, 1, 1)
    if shift is not None:
        x.add_(shift.to(x.device).view(-1, 3, 1, 1))
    return x.sub_(mean).div_(std)


def pca_shift(rng: np.random.Generator, n: int, stats: ColorStats, pca_std: float) -> np.ndarray:
    """Per-image RGB offsets of the paper's PCA lighting: (n, 3) float32.

    shift_b = sum_i p_i * alpha_{b,i} * lambda_i with alpha ~ N(0, pca_std).
    """
    alpha = rng.normal(0.0, pca_std, size=(n, 3))  # (n, 3)
    eigvec = np.asarray(stats.eigvec)  # (3, 3), columns are eigenvectors
    return ((alpha * np.asarray(stats.eigval)) @ eigvec.T).astype(np.float32)


def _draws(rng: np.random.Generator, n: int, stats: ColorStats, pca_std: float):
    """One batch's random choices: crop offsets, flips (n,) and lighting shifts (n, 3).

    Offsets are drawn large and reduced modulo each image's valid range, so the draws do
    not depend on image sizes and CPU and GPU paths consume the stream identically.
    """
    ys = rng.integers(0, 1 << 30, size=n)
    xs = rng.integers(0, 1 << 30, size=n)
    flips = rng.random(n) < 0.5
    return ys, xs, flips, pca_shift(rng, n, stats, pca_std)


class AugmentedBatch:
    """A batch being augmented on `TrainAugment`'s threads."""

    def __init__(self, futures: list[Future], out: torch.Tensor) -> None:
        self._futures = futures
        self._out = out

    def result(self) -> torch.Tensor:
        """Waits for every image; re-raises the first image's error, if any."""
        for f in self._futures:
            f.result()
        return self._out


class TrainAugment:
    """Decode + random crop + flip + PCA lighting + normalisation for one batch at a time."""

    def __init__(self, stats: ColorStats, crop: int, pca_std: float, threads: int = 2) -> None:
        self.stats = stats
        self.crop = crop
        self.pca_std = pca_std
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="augment")
        self._band = max(1, _SERIAL_VALUES // (crop * 3))  # rows per torch op in _crop_one

    def _crop_one(
        self,
        jpeg: bytes,
        y: int,
        x: int,
        flip: bool,
        scale: torch.Tensor,
        offset: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """Decodes, crops, flips and normalises one image into `out` ((crop, crop, 3) float32)."""
        img = decode_jpeg(jpeg, reuse_buffer=True)  # (S, S, 3) uint8, this thread's buffer
        h, w = img.shape[:2]
        if h < self.crop or w < self.crop:
            raise ValueError(f"stored image is {h}x{w}, smaller than train.crop={self.crop}")
        y, x = y % (h - self.crop + 1), x % (w - self.crop + 1)
        patch = torch.from_numpy(img[y : y + self.crop, x : x + self.crop])  # (crop, crop, 3) uint8
        if flip:
            patch = patch.flip(1)  # W axis
        # (x / 255 + shift - mean) / std == offset + x * scale, fused in one pass (torch
        # releases the GIL; numpy's uint8 * float32 broadcast was 3x slower). In bands
        # of rows below torch's parallel grain (32768 values), so each op stays on this
        # thread: whole-image ops fanned out to torch's OpenMP threads, which the other
        # augmentation threads then fought over (-19% images/s on 2 cores).
        for r in range(0, self.crop, self._band):
            torch.addcmul(offset, patch[r : r + self._band], scale, out=out[r : r + self._band])

    def __call__(self, jpegs: list[bytes], rng: np.random.Generator) -> torch.Tensor:
        """Augments one batch and waits for it: `submit(jpegs, rng).result()`."""
        return self.submit(jpegs, rng).result()

    def submit(self, jpegs: list[bytes], rng: np.random.Generator) -> AugmentedBatch:
        """Starts augmenting one batch on the threads and returns at once.

        Submitting the next batch before waiting for this one keeps every thread busy
        across batch boundaries (a batch's last images otherwise leave threads idle).
        Normalisation runs per image on the threads, fused with the lighting shift,
        instead of five passes over the whole float batch after it (a third of the time
        of a batch on 2 cores, benchmarks/input_pipeline.py).

        Args:
            jpegs: Stored JPEG bytes, one per image.
            rng: The batch's generator; the same generator state gives the same batch.
                All draws happen here, so batches may complete in any order.

        Returns:
            The pending batch; its `result()` is (B, 3, crop, crop) float32, normalised
            (channels_last memory layout).
        """
        ys, xs, flips, shift = _draws(rng, len(jpegs), self.stats, self.pca_std)
        mean = torch.tensor(self.stats.mean, dtype=torch.float32)
        std = torch.tensor(self.stats.std, dtype=torch.float32)
        scale = 1.0 / (255.0 * std)  # (3,)
        offsets = (torch.from_numpy(shift) - mean) / std  # (B, 3) float32
        out = _empty_float32((len(jpegs), self.crop, self.crop, 3))  # (B, crop, crop, 3)
        futures = [
            self._pool.submit(self._crop_one, *args, scale, offset, dst)
            for *args, offset, dst in zip(jpegs, ys, xs, flips, offsets, out, strict=True)
        ]
        return AugmentedBatch(futures, out.permute(0, 3, 1, 2))  # (B, 3, crop, crop)

    def decode(self, jpegs: list[bytes]) -> list[np.ndarray]:
        """Decodes stored images on the augmentation threads: (S, S, 3) uint8 each."""
        return list(self._pool.map(decode_jpeg, jpegs))

    def close(self) -> None:
        """Stops the decode threads."""
        self._pool.shutdown(wait=True)


def ten_crop_boxes(size: int, crop: int) -> list[tuple[int, int]]:
    """Top-left corners of the paper's five test patches: four corners, then the centre."""
    c = (size - crop) // 2
    m = size - crop
    return [(0, 0), (0, m), (m, 0), (m, m), (c, c)]


def eval_batch(images: list[np.ndarray], stats: ColorStats, crop: int, ten_crop: bool) -> torch.Tensor:
    """Evaluation crops of decoded images.

    Args:
        images: (S, S, 3) uint8 images.
        stats: Normalisation statistics.
        crop: Patch size.
        ten_crop: False: the centre crop only. True: the paper's ten patches.

    Returns:
        (B, 3, crop, crop) for the centre crop, or (B, 10, 3, crop, crop) float32:
        five patches (corners, centre) then their reflections.
    """
    batch = torch.from_numpy(np.stack(images))  # (B, S, S, 3) uint8
    size = batch.shape[1]
    if size < crop or batch.shape[2] < crop:
        raise ValueError(f"stored images are {size}x{batch.shape[2]}, smaller than crop={crop}")
    boxes = ten_crop_boxes(size, crop) if ten_crop else [ten_crop_boxes(size, crop)[4]]
    batch = batch.permute(0, 3, 1, 2)  # (B, 3, S, S)
    patches = [batch[..., y : y + crop, x : x + crop] for y, x in boxes]
    if ten_crop:
        patches += [p.flip(-1) for p in patches]  # horizontal reflections (W axis)
    out = torch.stack([_normalize(p, stats, None) for p in patches], dim=1)  # (B, K, 3, c, c)
    return out if ten_crop else out[:, 0]


class GpuTrainAugment:
    """The same augmentation with decoding on the GPU (nvJPEG through torchvision).

    `torchvision.io.decode_jpeg` takes the whole batch as a list and decodes it on the
    device; crops, flips, lighting and normalisation then run there too, so the CPU only
    moves compressed bytes. Consumes the generator exactly like `TrainAugment`.
    """

    def __init__(self, stats: ColorStats, crop: int, pca_std: float, device: torch.device | str) -> None:
        self.stats = stats
        self.crop = crop
        self.pca_std = pca_std
        self.device = torch.device(device)

    def submit(self, jpegs: list[bytes], rng: np.random.Generator) -> Future:
        """Augments one batch (queued on the device's stream); `result()` returns it."""
        done: Future = Future()
        done.set_result(self(jpegs, rng))
        return done

    def __call__(self, jpegs: list[bytes], rng: np.random.Generator) -> torch.Tensor:
        """Augments one batch: (B, 3, crop, crop) float32 on `device`."""
        from torchvision.io import ImageReadMode, decode_jpeg

        ys, xs, flips, shift = _draws(rng, len(jpegs), self.stats, self.pca_std)
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)  # [(3, S, S) uint8]
        c = self.crop
        crops = []
        for img, y, x, flip in zip(images, ys, xs, flips, strict=True):
            h, w = img.shape[1:]
            if h < c or w < c:
                raise ValueError(f"stored image is {h}x{w}, smaller than train.crop={c}")
            y, x = int(y % (h - c + 1)), int(x % (w - c + 1))
            patch = img[:, y : y + c, x : x + c]
            crops.append(patch.flip(-1) if flip else patch)
        return _normalize(torch.stack(crops), self.stats, torch.from_numpy(shift))

    def decode(self, jpegs: list[bytes]) -> list[np.ndarray]:
        """Decodes for validation on the CPU: (S, S, 3) uint8 each."""
        return [decode_jpeg(b) for b in jpegs]

    def close(self) -> None:
        """Nothing to release."""
