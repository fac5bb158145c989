"""A worker's epoch of batches: every row once, reproducible, independent of Ray's blocks."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from pipeline.train.batches import epoch_batches

ROWS = 103  # not a multiple of the batch: the tail is dropped, as drop_last does


def dataset(blocks: int) -> ray.data.Dataset:
    rows = [{"key": f"k{i:03d}", "label": i % 7, "jpeg": bytes([i])} for i in range(ROWS)]
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds.context.execution_options.preserve_order = True  # as the trainer's DataConfig sets it
    return ds


def keys(blocks: int, epoch: int, seed: int = 0, batch: int = 10) -> list[list[str]]:
    return [list(b["key"]) for b in epoch_batches(dataset(blocks), batch, seed, epoch)]


def test_every_row_once_in_whole_batches(ray_local: None) -> None:
    batches = keys(blocks=4, epoch=0)
    seen = [k for b in batches for k in b]
    assert all(len(b) == 10 for b in batches) and len(batches) == ROWS // 10
    assert len(set(seen)) == len(seen)  # no row twice
    assert len(seen) == ROWS - ROWS % 10  # only the tail dropped


def test_rows_keep_their_labels_and_bytes(ray_local: None) -> None:
    for b in epoch_batches(dataset(3), 10, 0, 0):
        ids = [int(k[1:]) for k in b["key"]]
        assert b["label"].dtype == np.int64 and list(b["label"]) == [i % 7 for i in ids]
        assert list(b["jpeg"]) == [bytes([i]) for i in ids]


def test_same_seed_and_epoch_same_batches_whatever_the_blocks(ray_local: None) -> None:
    assert keys(blocks=1, epoch=2) == keys(blocks=7, epoch=2)


@pytest.mark.parametrize(("epoch", "seed"), [(1, 0), (0, 1)])
def test_another_epoch_or_seed_reshuffles(ray_local: None, epoch: int, seed: int) -> None:
    assert keys(blocks=2, epoch=epoch, seed=seed) != keys(blocks=2, epoch=0, seed=0)
