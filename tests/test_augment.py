"""The paper's augmentation and test-time crops, checked against the images themselves."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.stats import ColorStats
from pipeline.transforms import (
    GpuTrainAugment,
    TrainAugment,
    eval_batch,
    five_crop_boxes,
    pca_shift,
)

IDENTITY = ColorStats(
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    eigval=(0.2175, 0.0188, 0.0045),
    eigvec=((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203)),
)


def png_bytes(img: np.ndarray) -> bytes:
    # Lossless, so decoded pixels equal `img` exactly.
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8) for _ in range(6)]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_train_crops_are_patches_or_their_mirrors(images: list[np.ndarray]) -> None:
    aug = TrainAugment(IDENTITY, crop=32, pca_std=0.0, threads=2)
    out = aug([png_bytes(i) for i in images], np.random.default_rng(1))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    flips = 0
    for img, x in zip(images, out, strict=True):
        patch = to_uint8(x)
        found = [
            (y, xx, flip)
            for y in range(9)
            for xx in range(9)
            for flip in (False, True)
            if np.array_equal(
                (img[y : y + 32, xx : xx + 32, :][:, ::-1] if flip else img[y : y + 32, xx : xx + 32]), patch
            )
        ]
        assert found, "output is not a crop of its image"
        flips += found[0][2]
    assert 0 < flips < 6  # both orientations occur over a batch with this seed
    aug.close()


def test_train_batches_reproducible_from_rng(images: list[np.ndarray]) -> None:
    aug = TrainAugment(IDENTITY, crop=32, pca_std=0.1)
    jpegs = [png_bytes(i) for i in images]
    a = aug(jpegs, np.random.default_rng(7))
    b = aug(jpegs, np.random.default_rng(7))
    c = aug(jpegs, np.random.default_rng(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    aug.close()


def test_batches_in_flight_match_batches_one_at_a_time() -> None:
    # JPEGs, so each thread decodes into its own reused buffer: three threads with three
    # batches queued must give exactly what one thread gives one batch at a time.
    rng = np.random.default_rng(4)
    jpegs = []
    for _ in range(24):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    many, one = (
        TrainAugment(IDENTITY, crop=32, pca_std=0.1, threads=3),
        TrainAugment(IDENTITY, crop=32, pca_std=0.1, threads=1),
    )
    pending = [many.submit(jpegs, np.random.default_rng(seed)) for seed in (1, 2, 3)]
    for seed, batch in zip((1, 2, 3), pending, strict=True):
        assert torch.equal(batch.result(), one(jpegs, np.random.default_rng(seed)))
    many.close()
    one.close()


def test_pca_shift_is_eigvec_times_scaled_eigval() -> None:
    alpha = np.random.default_rng(3).normal(0.0, 0.1, size=(4, 3))
    expected = np.array(
        [sum(np.array(IDENTITY.eigvec)[:, i] * a[i] * IDENTITY.eigval[i] for i in range(3)) for a in alpha]
    )
    got = pca_shift(np.random.default_rng(3), 4, IDENTITY, 0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_lighting_shifts_every_pixel_by_the_same_rgb_offset(images: list[np.ndarray]) -> None:
    jpegs = [png_bytes(i) for i in images]
    plain = TrainAugment(IDENTITY, crop=32, pca_std=0.0)(jpegs, np.random.default_rng(5))
    lit = TrainAugment(IDENTITY, crop=32, pca_std=0.5)(jpegs, np.random.default_rng(5))
    diff = (lit - plain).flatten(2)  # (B, 3, H*W): constant per image and channel
    assert torch.allclose(diff, diff[..., :1].expand_as(diff), atol=1e-5)
    assert diff.abs().max() > 1e-3


def test_normalisation_uses_stats() -> None:
    stats = ColorStats(
        mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), eigval=IDENTITY.eigval, eigvec=IDENTITY.eigvec
    )
    img = np.full((8, 8, 3), 255, dtype=np.uint8)
    x = eval_batch([img], stats, crop=8, ten_crop=False)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [1.0, 3.0, 1.0], rtol=1e-6)


REAL = ColorStats(  # ImageNet's published statistics: no channel is the identity
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    eigval=IDENTITY.eigval,
    eigvec=IDENTITY.eigvec,
)


def test_training_normalisation_is_the_formula_and_evaluations(images: list[np.ndarray]) -> None:
    # Crop = image size and no lighting: the training batch is the whole image, maybe
    # mirrored, normalised by the fused per-image path; evaluation normalises in one pass.
    jpegs = [png_bytes(i) for i in images]
    train = TrainAugment(REAL, crop=40, pca_std=0.0)(jpegs, np.random.default_rng(3))
    evals = eval_batch(images, REAL, crop=40, ten_crop=False)
    mean, std = np.array(REAL.mean)[:, None, None], np.array(REAL.std)[:, None, None]
    for img, x, e in zip(images, train, evals, strict=True):
        expected = (img.transpose(2, 0, 1) / 255.0 - mean) / std  # (3, 40, 40) float64
        np.testing.assert_allclose(e.numpy(), expected, atol=1e-5)
        mirrored = not np.allclose(x.numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(x.numpy(), expected[..., ::-1] if mirrored else expected, atol=1e-5)


def test_ten_crop_is_corners_centre_and_reflections(images: list[np.ndarray]) -> None:
    x = eval_batch(images[:2], IDENTITY, crop=32, ten_crop=True)
    assert x.shape == (2, 10, 3, 32, 32)
    for k, (y, xx) in enumerate(five_crop_boxes(40, 32)):
        np.testing.assert_array_equal(to_uint8(x[0, k]), images[0][y : y + 32, xx : xx + 32])
        np.testing.assert_array_equal(to_uint8(x[0, 5 + k]), images[0][y : y + 32, xx : xx + 32][:, ::-1])
    assert five_crop_boxes(40, 32) == [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]
    centre = eval_batch(images[:2], IDENTITY, crop=32, ten_crop=False)
    assert torch.equal(centre, x[:, 4])


def test_crop_larger_than_image_is_a_clear_error(images: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match="smaller than the crop 64"):
        TrainAugment(IDENTITY, crop=64, pca_std=0.1)([png_bytes(images[0])], np.random.default_rng(0))


def test_stats_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(ValueError, match="stats.json: missing key 'std'"):
        ColorStats.read(str(path))


def test_gpu_path_matches_cpu_path_on_the_same_draws(images: list[np.ndarray]) -> None:
    # The GPU option's code, run on the CPU device (CI has no GPU): same draws, same crops.
    def jpeg(img: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    jpegs = [jpeg(i) for i in images]
    cpu = TrainAugment(IDENTITY, crop=32, pca_std=0.1)(jpegs, np.random.default_rng(11))
    dev = GpuTrainAugment(IDENTITY, crop=32, pca_std=0.1, device="cpu")(jpegs, np.random.default_rng(11))
    assert dev.shape == cpu.shape == (6, 3, 32, 32)
    assert (dev - cpu).abs().max() <= 2 / 255 + 1e-6  # two JPEG decoders, within rounding
