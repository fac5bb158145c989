"""A worker's epoch of batches: every row once, reproducible, independent of Ray's blocks."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from pipeline.train.batches import EpochRows, epoch_batches, worker_files

ROWS = 103  # not a multiple of the batch: the last batch is partial


def dataset(blocks: int) -> ray.data.Dataset:
    rows = [{"key": f"k{i:03d}", "label": i % 7, "jpeg": bytes([i])} for i in range(ROWS)]
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds.context.execution_options.preserve_order = True  # as the trainer's DataConfig sets it
    return ds


def keys(blocks: int, epoch: int, seed: int = 0, batch: int = 10) -> list[list[str]]:
    chunks = dataset(blocks).iter_batches(batch_size=batch, batch_format="numpy")
    return [list(b["key"]) for b in epoch_batches(chunks, batch, seed, epoch)]


def test_every_row_once_the_last_batch_partial(ray_local: None) -> None:
    batches = keys(blocks=4, epoch=0)
    seen = [k for b in batches for k in b]
    assert [len(b) for b in batches] == [10] * (ROWS // 10) + [ROWS % 10]
    assert sorted(seen) == [f"k{i:03d}" for i in range(ROWS)]  # each row once


def test_rows_keep_their_labels_and_bytes(ray_local: None) -> None:
    for b in epoch_batches(dataset(3).iter_batches(batch_size=10, batch_format="numpy"), 10, 0, 0):
        ids = [int(k[1:]) for k in b["key"]]
        assert b["label"].dtype == np.int64 and list(b["label"]) == [i % 7 for i in ids]
        assert list(b["jpeg"]) == [bytes([i]) for i in ids]


def test_same_seed_and_epoch_same_batches_whatever_the_blocks(ray_local: None) -> None:
    assert keys(blocks=1, epoch=2) == keys(blocks=7, epoch=2)


@pytest.mark.parametrize(("epoch", "seed"), [(1, 0), (0, 1)])
def test_another_epoch_or_seed_reshuffles(ray_local: None, epoch: int, seed: int) -> None:
    assert keys(blocks=2, epoch=epoch, seed=seed) != keys(blocks=2, epoch=0, seed=0)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_workers_share_every_file_once(world: int) -> None:
    files = [f"part-{i}" for i in range(7)]  # 7 files: no world here divides them evenly
    for epoch in range(3):
        shares = [worker_files(files, 0, epoch, rank, world) for rank in range(world)]
        assert sorted(f for share in shares for f in share) == files
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert worker_files(files, 0, 0, 0, 2) != worker_files(files, 0, 1, 0, 2)  # fresh every epoch
    assert worker_files(files, 0, 1, 0, 2) == worker_files(files, 0, 1, 0, 2)  # and reproducible


def test_epoch_rows_start_each_epoch_as_the_last_one_runs_out(ray_local: None) -> None:
    calls: list[int] = []

    def read(epoch: int):
        calls.append(epoch)
        ds = dataset(3).map(lambda row, e=epoch: {**row, "key": f"{row['key']}-e{e}"})  # whose rows
        return ds.iter_batches(batch_size=10, batch_format="numpy")

    rows = EpochRows(read, epochs=3, ahead=2)
    for epoch in range(3):
        chunks = rows.epoch(epoch)
        first = next(chunks)
        assert calls == list(range(epoch + 1))  # the next epoch not read before this one's rows are in
        got = [*first["key"], *(k for c in chunks for k in c["key"])]
        assert got == [f"k{i:03d}-e{epoch}" for i in range(ROWS)]  # every row, in order
        assert calls == list(range(min(epoch + 2, 3)))  # read ahead now; never past the last epoch


def test_epoch_rows_read_an_epoch_asked_out_of_turn_afresh(ray_local: None) -> None:
    calls: list[int] = []

    def read(epoch: int):
        calls.append(epoch)
        return dataset(2).iter_batches(batch_size=10, batch_format="numpy")

    rows = EpochRows(read, epochs=4, ahead=1)
    assert sum(len(c["key"]) for c in rows.epoch(2)) == ROWS  # a resumed run starts at its epoch
    assert calls == [2, 3]
    assert sum(len(c["key"]) for c in rows.epoch(3)) == ROWS and calls == [2, 3]
