"""Training-set pixel statistics: per-channel mean/std and the RGB PCA of "fancy PCA".

One Ray task per training shard accumulates, in float64 over pixels scaled to [0, 1],
the pixel count, the per-channel sums and the 3x3 matrix of cross-products; the driver
adds them up. Moments, not per-shard means, are combined, so the result is exact
whatever the shard sizes.
"""

from __future__ import annotations

import numpy as np
import ray

from pipeline.data.preprocess import decode_jpeg
from pipeline.data.shards import FORMATS, iter_shard, shard_files

CHANNELS = 3
MAX_VALUE = 255.0  # uint8 pixels -> [0, 1]


def _shard_moments(uri: str, fmt: str) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Ray task body: (images, pixels, sum (3,), cross-products (3, 3)) of one shard, raw
    uint8 units."""
    images, pixels = 0, 0
    total = np.zeros(CHANNELS)
    cross = np.zeros((CHANNELS, CHANNELS))
    for _, _, jpeg in iter_shard(uri, fmt):
        x = decode_jpeg(jpeg).reshape(-1, CHANNELS).astype(np.float64)  # (H*W, 3)
        images += 1
        pixels += len(x)
        total += x.sum(axis=0)
        cross += x.T @ x
    return images, pixels, total, cross


def compute_stats(shards_dir: str, *, fmt: str = "parquet", max_shards: int = 0) -> dict:
    """Computes pixel statistics of the training shards, one Ray task per shard.

    Initialises a local Ray if the caller has not.

    Args:
        shards_dir: The `out_dir` of `write_shards` (local path or URI).
        fmt: Which copy of the shards to read: "parquet" or "webdataset".
        max_shards: Use only the first this many train shards (0: all). Train shards
            are class-mixed by the seeded shuffle, so a prefix is a uniform sample.

    Returns:
        JSON-serialisable dict, pixels scaled to [0, 1]:
        mean, std: per channel (R, G, B); std is the population std.
        cov: 3x3 RGB covariance (population, i.e. divided by num_pixels).
        eigval: eigenvalues of cov, descending.
        eigvec: eigvec[i][j] = component i (R, G, B) of eigenvector j, i.e. columns are
            eigenvectors as numpy.linalg.eigh returns them, reordered to match eigval.
            Each column's sign is arbitrary, as in eigh.
        num_images, num_pixels: what was counted.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if max_shards < 0:
        raise ValueError(f"max_shards must be >= 0 (0: all), got {max_shards}")
    uris = shard_files(shards_dir, "train", fmt)
    uris = uris[:max_shards] if max_shards else uris
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(_shard_moments)
    parts = ray.get([task.remote(uri, fmt) for uri in uris])
    images = sum(p[0] for p in parts)
    pixels = sum(p[1] for p in parts)
    if pixels == 0:
        raise ValueError(f"no training images in {shards_dir}")
    mean = sum(p[2] for p in parts) / pixels / MAX_VALUE
    cov = sum(p[3] for p in parts) / pixels / MAX_VALUE**2 - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigval)[::-1]
    return {
        "mean": mean.tolist(),
        "std": np.sqrt(np.diag(cov)).tolist(),
        "cov": cov.tolist(),
        "eigval": eigval[order].tolist(),
        "eigvec": eigvec[:, order].tolist(),
        "num_images": images,
        "num_pixels": pixels,
    }
