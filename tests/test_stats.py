"""compute_stats against numpy on the decoded training pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_imagenet import make_imagenet

from pipeline.config import ShardParams
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.preprocess import decode_jpeg
from pipeline.data.shard_writer import write_shards
from pipeline.data.shards import read_shards
from pipeline.data.stats import ColorStats, compute_stats


@pytest.fixture(scope="module")
def shards(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("stats")
    catalog = ingest_imagenet(str(make_imagenet(base / "src", "folders")))
    out = base / "out"
    settings = ShardParams(size=48, shard_size=2)
    write_shards(catalog.records, out, classes=catalog.classes, settings=settings, progress=False)
    return out


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_stats_match_numpy(shards: Path, fmt: str) -> None:
    stats = compute_stats(str(shards), fmt=fmt)
    images = [row["image"] for row in read_shards(str(shards), "train").take_all()]
    x = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255  # (P, 3)
    assert stats.num_images == len(images) == 7
    assert stats.num_pixels == len(x) == 7 * 48 * 48
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.std, x.std(axis=0), rtol=1e-8)
    cov = np.cov(x, rowvar=False, bias=True)
    np.testing.assert_allclose(stats.cov, cov, rtol=1e-8, atol=1e-12)
    eigval, eigvec = np.array(stats.eigval), np.array(stats.eigvec)
    assert np.all(np.diff(eigval) < 0)  # descending
    np.testing.assert_allclose(eigval, np.linalg.eigvalsh(cov)[::-1], rtol=1e-8)
    for j in range(3):  # columns are eigenvectors
        np.testing.assert_allclose(cov @ eigvec[:, j], eigval[j] * eigvec[:, j], atol=1e-12)
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-12)
    assert ColorStats.from_dict(json.loads(stats.to_json())) == stats


def test_max_shards_uses_a_prefix(shards: Path) -> None:
    stats = compute_stats(str(shards), max_shards=1)
    first = pq.read_table(shards / "parquet" / "train" / "part-00000.parquet")
    x = np.concatenate([decode_jpeg(b).reshape(-1, 3) for b in first["jpeg"].to_pylist()]) / 255
    assert stats.num_images == first.num_rows == 2
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-10)


def test_stats_rejects_unknown_format(shards: Path) -> None:
    with pytest.raises(ValueError, match="fmt must be one of"):
        compute_stats(str(shards), fmt="tfrecord")
