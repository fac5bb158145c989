"""A shard damaged on disk after the shard stage wrote it: the stages stop with an error
naming the file and what is wrong, before any of its bytes are used, never train on garbage
or hang; `python -m cli.verify` names it too. (On S3: tests/test_shard_store.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.data.shards import ShardMeta
from tests.conftest import stage_env


def stage(ws: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"], cwd=ws, env=stage_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_a_tar_cut_short_stops_training_before_the_first_epoch(workspace_copy) -> None:
    ws = workspace_copy("cut", {"data": {"format": "webdataset"}})
    victim = Path(ShardMeta.read(str(ws / "data/shards")).files("train", "webdataset")[1])
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])

    out = stage(ws, "train")
    assert out.returncode != 0
    assert f"{victim}: {len(data) // 2} bytes, meta.json lists {len(data)}" in out.stderr
    assert not (ws / "artifacts").exists()  # stopped before Ray Train made its run folder
    verify = subprocess.run(
        [sys.executable, "-m", "cli.verify"], cwd=ws, env=stage_env(), capture_output=True, text=True
    )
    assert verify.returncode == 1 and f"BAD  {victim}" in verify.stdout


def test_a_flipped_byte_in_a_parquet_page_stops_the_reader_naming_the_file(workspace_copy) -> None:
    ws = workspace_copy("flipped")
    victim = Path(ShardMeta.read(str(ws / "data/shards")).files("train", "parquet")[0])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the JPEG column's page: the length stays
    victim.write_bytes(bytes(data))

    out = stage(ws, "stats")  # reads every train shard through the same checked reader as training
    assert out.returncode != 0
    assert f"CorruptShardError: {victim}: SHA-256" in out.stderr and "rerun the shard stage" in out.stderr
