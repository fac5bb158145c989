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

import math
import mmap
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from pipeline.data.preprocess import decode_jpeg
from pipeline.data.stats import ColorStats

_SERIAL_VALUES = 32768  # torch's at::internal::GRAIN_SIZE: smaller ops run on the calling thread


def _empty_float32(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor in memory backed by transparent huge pages.

    A training batch (128 x 224 x 224 x 3 float32: 77 MB) is above glibc's mmap
    threshold, so every batch is fresh memory whose first writes fault in one 4 KiB page
    at a time; 2 MiB pages make that a few dozen faults (README, benchmark section).
    Where madvise(MADV_HUGEPAGE) is unavailable this is torch.empty.
    """
    nbytes = 4 * math.prod(shape)
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes == 0:
        return torch.empty(shape, dtype=torch.float32)
    # Private: an anonymous MAP_SHARED mapping (mmap's default) is shmem, which gets no THP.
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # unmapped when the tensor dies
    buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.float32).view(shape)  # keeps buf alive


def _affine(stats: ColorStats, shift: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation as one multiply-add per value: the only place it is defined.

    (x / 255 + shift - mean) / std == x * scale + offset, x in uint8 units.

    Args:
        stats: Normalisation statistics.
        shift: (B, 3) float32 lighting offsets in [0, 1] units (zeros: none).

    Returns:
        scale (3,) and offset (B, 3), float32.
    """
    mean = torch.tensor(stats.mean, dtype=torch.float32)
    std = torch.tensor(stats.std, dtype=torch.float32)
    return 1.0 / (255.0 * std), (torch.from_numpy(shift) - mean) / std


def _normalize(crops: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) uint8 -> (B, 3, h, w) float32 through `_affine`'s scale and offset."""
    scale, offset = scale.to(crops.device).view(1, 3, 1, 1), offset.to(crops.device).view(-1, 3, 1, 1)
    return torch.addcmul(offset, crops.float(), scale)


def _check_fits(h: int, w: int, crop: int) -> None:
    """Raises when a stored image is too small for the crop (shards of another size)."""
    if h < crop or w < crop:
        raise ValueError(f"stored image is {h}x{w}, smaller than the crop {crop} (train.crop)")


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


class PendingBatch(Protocol):
    """A batch an `Augmenter` is preparing."""

    def result(self) -> torch.Tensor:
        """Waits for the batch: (B, 3, crop, crop) float32, normalised."""
        ...


class Augmenter(Protocol):
    """What the training loop needs from an augmentation: CPU threads or the GPU."""

    def submit(self, jpegs: list[bytes], rng: np.random.Generator) -> PendingBatch:
        """Starts one batch; all random draws happen here, in call order."""
        ...

    def decode(self, jpegs: list[bytes]) -> list[np.ndarray]:
        """Decodes stored images for validation: (S, S, 3) uint8 each."""
        ...

    def close(self) -> None:
        """Releases threads or buffers."""
        ...


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


class QueuedBatch:
    """A batch whose kernels are already queued on a CUDA stream: `result` returns it."""

    def __init__(self, out: torch.Tensor) -> None:
        self._out = out

    def result(self) -> torch.Tensor:
        """The batch; using it on the same stream orders after its kernels."""
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
        _check_fits(h, w, self.crop)
        y, x = y % (h - self.crop + 1), x % (w - self.crop + 1)
        patch = torch.from_numpy(img[y : y + self.crop, x : x + self.crop])  # (crop, crop, 3) uint8
        if flip:
            patch = patch.flip(1)  # W axis
        # `_affine`'s multiply-add, fused with the lighting shift in one pass (torch
        # releases the GIL). In bands of rows below torch's parallel grain (32768
        # values), so each op stays on this thread: whole-image ops fan out to torch's
        # OpenMP threads, which the other augmentation threads would then fight over.
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
        instead of several passes over the whole float batch after it.

        Args:
            jpegs: Stored JPEG bytes, one per image.
            rng: The batch's generator; the same generator state gives the same batch.
                All draws happen here, so batches may complete in any order.

        Returns:
            The pending batch; its `result()` is (B, 3, crop, crop) float32, normalised
            (channels_last memory layout).
        """
        ys, xs, flips, shift = _draws(rng, len(jpegs), self.stats, self.pca_std)
        scale, offsets = _affine(self.stats, shift)  # (3,), (B, 3) float32
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


def five_crop_boxes(size: int, crop: int) -> list[tuple[int, int]]:
    """Top-left corners of the paper's five test patches: four corners, then the centre
    (with their reflections, the ten crops)."""
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
    _check_fits(size, batch.shape[2], crop)
    boxes = five_crop_boxes(size, crop) if ten_crop else [five_crop_boxes(size, crop)[4]]
    batch = batch.permute(0, 3, 1, 2)  # (B, 3, S, S)
    patches = [batch[..., y : y + crop, x : x + crop] for y, x in boxes]
    if ten_crop:
        patches += [p.flip(-1) for p in patches]  # horizontal reflections (W axis)
    scale, offset = _affine(stats, np.zeros((1, 3), dtype=np.float32))
    out = torch.stack([_normalize(p, scale, offset) for p in patches], dim=1)  # (B, K, 3, c, c)
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

    def submit(self, jpegs: list[bytes], rng: np.random.Generator) -> QueuedBatch:
        """Queues one batch's decode and augmentation on the device's stream.

        The GPU runs the kernels asynchronously, so there is nothing to hold in flight
        on the host: the batch comes back already queued.
        """
        return QueuedBatch(self(jpegs, rng))

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
            _check_fits(h, w, c)
            y, x = int(y % (h - c + 1)), int(x % (w - c + 1))
            patch = img[:, y : y + c, x : x + c]
            crops.append(patch.flip(-1) if flip else patch)
        return _normalize(torch.stack(crops), *_affine(self.stats, shift))

    def decode(self, jpegs: list[bytes]) -> list[np.ndarray]:
        """Decodes for validation on the CPU: (S, S, 3) uint8 each."""
        return [decode_jpeg(b) for b in jpegs]

    def close(self) -> None:
        """Nothing to release."""
