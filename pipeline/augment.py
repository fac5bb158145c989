"""The paper's data augmentation and evaluation crops, defined once for training and evaluation.

Training (Krizhevsky et al. 2012, section 4.1): a random `crop` x `crop` patch of the
stored `size` x `size` image, a horizontal flip with probability 1/2, and "fancy PCA"
lighting: add eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, pca_std) drawn once
per image per use. Then per-channel mean/std normalisation (pixels scaled to [0, 1]).

Evaluation: the centre crop, or the paper's ten crops (four corners and centre, and their
reflections), whose softmax outputs the caller averages.

JPEG decoding runs in a thread pool: Pillow releases the GIL while decoding, so threads
use every core without copying images between processes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.preprocess import decode_jpeg


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


class TrainAugment:
    """Decode + random crop + flip + PCA lighting + normalisation for one batch at a time."""

    def __init__(self, stats: ColorStats, crop: int, pca_std: float, threads: int = 2) -> None:
        self.stats = stats
        self.crop = crop
        self.pca_std = pca_std
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="augment")

    def _crop_one(
        self, jpeg: bytes, y: int, x: int, flip: bool, scale: np.ndarray, offset: np.ndarray, out: np.ndarray
    ) -> None:
        """Decodes, crops, flips and normalises one image into `out` ((crop, crop, 3) float32)."""
        img = decode_jpeg(jpeg)  # (S, S, 3) uint8
        h, w = img.shape[:2]
        if h < self.crop or w < self.crop:
            raise ValueError(f"stored image is {h}x{w}, smaller than train.crop={self.crop}")
        y, x = y % (h - self.crop + 1), x % (w - self.crop + 1)
        patch = img[y : y + self.crop, x : x + self.crop]
        # Two passes over a cache-sized image on this thread (numpy releases the GIL):
        # (x / 255 + shift - mean) / std == x * scale + offset, per channel.
        np.multiply(patch[:, ::-1] if flip else patch, scale, out=out)
        out += offset

    def __call__(self, jpegs: list[bytes], rng: np.random.Generator) -> torch.Tensor:
        """Augments one batch.

        Normalisation runs per image on the decode threads, fused with the lighting shift,
        instead of five passes over the whole float batch after it (a third of the time
        of a batch on 2 cores, benchmarks/input_pipeline.py).

        Args:
            jpegs: Stored JPEG bytes, one per image.
            rng: The batch's generator; the same generator state gives the same batch.

        Returns:
            (B, 3, crop, crop) float32, normalised (channels_last memory layout).
        """
        ys, xs, flips, shift = _draws(rng, len(jpegs), self.stats, self.pca_std)
        mean = np.asarray(self.stats.mean, dtype=np.float32)
        std = np.asarray(self.stats.std, dtype=np.float32)
        scale = 1.0 / (255.0 * std)  # (3,)
        offsets = (shift - mean) / std  # (B, 3) float32
        out = np.empty((len(jpegs), self.crop, self.crop, 3), dtype=np.float32)  # (B, crop, crop, 3)
        scales = [scale] * len(jpegs)
        list(self._pool.map(self._crop_one, jpegs, ys, xs, flips, scales, offsets, out))
        return torch.from_numpy(out).permute(0, 3, 1, 2)  # (B, 3, crop, crop)

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
