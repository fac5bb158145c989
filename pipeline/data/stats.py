"""Training-set pixel statistics: per-channel mean/std and the RGB PCA of "fancy PCA".

One Ray task per training shard accumulates, in float64 over pixels scaled to [0, 1],
the pixel count, the per-channel sums and the 3x3 matrix of cross-products; the driver
adds them up. Moments, not per-shard means, are combined, so the result is exact
whatever the shard sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import ray

from pipeline import jsonfile
from pipeline.cluster import init_ray
from pipeline.data.preprocess import decode_jpeg
from pipeline.data.shards import FORMATS, ShardMeta, iter_shard
from pipeline.storage import atomic_write_text, read_bytes

CHANNELS = 3
MAX_VALUE = 255.0  # uint8 pixels -> [0, 1]

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class ColorStats:
    """Training-set colour statistics, pixels scaled to [0, 1]: the stats stage's output.

    Attributes:
        mean, std: Per channel (R, G, B); std is the population std.
        eigval: Eigenvalues of the RGB covariance, descending.
        eigvec: eigvec[i][j] = component i (R, G, B) of eigenvector j (columns are
            eigenvectors, as numpy.linalg.eigh returns them); each column's sign is arbitrary.
        cov: The 3x3 RGB covariance (population); empty for hand-made stats.
        num_images, num_pixels: What was counted (0 for hand-made stats).
    """

    mean: Vec3
    std: Vec3
    eigval: Vec3
    eigvec: tuple[Vec3, Vec3, Vec3]
    cov: tuple[Vec3, ...] = ()
    num_images: int = 0
    num_pixels: int = 0

    def to_json(self) -> str:
        """The stats file's text (the one writer's format)."""
        keys = ("mean", "std", "cov", "eigval", "eigvec", "num_images", "num_pixels")
        return json.dumps({k: getattr(self, k) for k in keys}, indent=1)

    def write(self, path: str) -> None:
        """Writes the stats file atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def read(cls, path: str) -> ColorStats:
        """Reads a stats file (local path or URI).

        Raises:
            ValueError: Naming the file: not JSON (with line and column), a key missing,
                or a value of the wrong shape.
        """
        return cls.from_dict(jsonfile.parse(read_bytes(path), path), path)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "stats") -> ColorStats:
        """Builds stats from the file's mapping (also the model card's copy).

        Args:
            raw: The stats file's object.
            source: Where `raw` came from, for messages.

        Raises:
            ValueError: Naming `source` and the key, when a key is missing or unknown, a
                vector does not have 3 finite values, eigvec or cov is not 3x3, or a std is
                not positive (images are divided by it).
        """
        jsonfile.check_fields(cls, raw, source)
        if len(raw.get("cov", ())) not in (0, CHANNELS):
            raise ValueError(f"{source}: cov: expected {CHANNELS} rows, got {len(raw['cov'])}")
        if min(raw["std"]) <= 0:
            raise ValueError(f"{source}: std={raw['std']}: expected values > 0")

        def vec(v: list[float]) -> Vec3:
            return tuple(float(x) for x in v)

        return cls(
            mean=vec(raw["mean"]),
            std=vec(raw["std"]),
            eigval=vec(raw["eigval"]),
            eigvec=tuple(vec(row) for row in raw["eigvec"]),
            cov=tuple(vec(row) for row in raw.get("cov", ())),
            num_images=raw.get("num_images", 0),
            num_pixels=raw.get("num_pixels", 0),
        )


def _shard_moments(uri: str, fmt: str, sha256: str) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Ray task body: (images, pixels, sum (3,), cross-products (3, 3)) of one shard (checked
    against its SHA-256), raw uint8 units."""
    images, pixels = 0, 0
    total = np.zeros(CHANNELS)
    cross = np.zeros((CHANNELS, CHANNELS))
    for _, _, jpeg in iter_shard(uri, fmt, sha256):
        x = decode_jpeg(jpeg).reshape(-1, CHANNELS).astype(np.float64)  # (H*W, 3)
        images += 1
        pixels += len(x)
        total += x.sum(axis=0)
        cross += x.T @ x
    return images, pixels, total, cross


def compute_stats(shards_dir: str, *, fmt: str = "parquet", max_shards: int = 0) -> ColorStats:
    """Computes pixel statistics of the training shards, one Ray task per shard.

    Starts a local Ray if the caller has not (`pipeline.cluster`).

    Args:
        shards_dir: The shard writer's output folder (local path or URI).
        fmt: Which copy of the shards to read: "parquet" or "webdataset".
        max_shards: Use only the first this many train shards (0: all). Train shards
            are class-mixed by the seeded shuffle, so a prefix is a uniform sample.

    Returns:
        The statistics, pixels scaled to [0, 1].
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if max_shards < 0:
        raise ValueError(f"max_shards must be >= 0 (0: all), got {max_shards}")
    digests = ShardMeta.read(shards_dir).digests("train", fmt)
    uris = list(digests)[:max_shards] if max_shards else list(digests)
    init_ray()
    task = ray.remote(_shard_moments)
    parts = ray.get([task.remote(uri, fmt, digests[uri]) for uri in uris])
    images = sum(p[0] for p in parts)
    pixels = sum(p[1] for p in parts)
    if pixels == 0:
        raise ValueError(f"no training images in {shards_dir}")
    mean = sum(p[2] for p in parts) / pixels / MAX_VALUE
    cov = sum(p[3] for p in parts) / pixels / MAX_VALUE**2 - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigval)[::-1]
    return ColorStats.from_dict(
        {
            "mean": mean.tolist(),
            "std": np.sqrt(np.diag(cov)).tolist(),
            "cov": cov.tolist(),
            "eigval": eigval[order].tolist(),
            "eigvec": eigvec[:, order].tolist(),
            "num_images": images,
            "num_pixels": pixels,
        }
    )
