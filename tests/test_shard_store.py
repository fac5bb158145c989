"""Shards in object storage, against a real S3 server (moto's): the shard stage's tasks
write the shard files straight to `data.shard_store`, the stage's DVC output keeps only
their manifest, the other stages read them from S3, every reader checks each file's
SHA-256, a stage killed, or losing its S3 server, while it uploads leaves nothing trusted
and reruns to the same manifest, and `python -m cli.verify` finds a changed shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest

from cli.services import S3Server, remove_all, start_s3
from pipeline.data.shards import META, ShardMeta
from tests.conftest import run_stage, stage_env, write_params

STORE = "s3://alexnet/shards"


def objects(fs: pafs.S3FileSystem, prefix: str) -> dict[str, bytes]:
    """Every object under s3://<prefix>, by URI, with its bytes."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_file(info.path) as f:
                out[f"s3://{info.path}"] = f.read()
    return out


def meta_json(ws: Path) -> dict:
    return json.loads((ws / "data/shards" / META).read_text())


def verify(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.verify", *args], cwd=ws, env=stage_env(), capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def on_s3(s3_server: S3Server, tiny_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny inputs (shards on disk) after a shard stage into STORE."""
    overrides = {"data": {"shard_store": STORE}}
    return sharded_copy(tiny_inputs, tmp_path_factory.mktemp("s3"), overrides, s3_server)


def sharded_copy(tiny_inputs: Path, ws: Path, overrides: dict, s3_server: S3Server) -> Path:
    """`ws`: a copy of the tiny inputs with `overrides`, after a shard stage with the S3
    server's settings (module fixtures cannot use the per-test `s3_env`)."""
    shutil.copytree(tiny_inputs, ws, dirs_exist_ok=True)
    write_params(ws, overrides)
    out = subprocess.run(
        [sys.executable, "-m", "stages.shard"], cwd=ws, env=stage_env() | s3_server.env(),
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return ws


def test_shards_written_to_s3_equal_local_ones_and_are_read_from_there(
    s3_env: pafs.S3FileSystem, tiny_inputs: Path, on_s3: Path, tmp_path: Path
) -> None:
    local = tiny_inputs  # sample, shard, stats already run, shards on disk
    ws = tmp_path / "s3"
    shutil.copytree(on_s3, ws)
    meta, local_meta = ShardMeta.read(str(ws / "data/shards")), ShardMeta.read(str(local / "data/shards"))
    assert sorted(p.name for p in (ws / "data/shards").iterdir()) == ["meta.json", "quarantine.csv"]
    stored = objects(s3_env, STORE.removeprefix("s3://"))
    for fmt in ("parquet", "webdataset"):
        files = meta.shard_files(fmt)
        assert [f.sha256 for f in files] == [f.sha256 for f in local_meta.shard_files(fmt)]  # same bytes
        assert {f.uri for f in files} <= set(stored)
        for f in files:  # content-addressed: s3://alexnet/shards/<fmt>/<split>/<name>-<16 hex>.<ext>
            assert f.uri.startswith(f"{STORE}/{fmt}/") and f"-{f.sha256[:16]}." in f.uri
            assert hashlib.sha256(stored[f.uri]).hexdigest() == f.sha256 and len(stored[f.uri]) == f.nbytes
    assert json.loads((ws / "metrics/shard.json").read_text())["sharded"] == {"train": 48, "val": 12}

    (ws / "data/stats.json").unlink()
    run_stage(ws, "stats")  # Ray tasks read the train shards from S3
    stats = json.loads((ws / "data/stats.json").read_text())
    assert stats == json.loads((local / "data/stats.json").read_text())

    ok = verify(ws)
    assert ok.returncode == 0 and "8 of 8 shard files" in ok.stdout, ok.stdout + ok.stderr


def test_changed_shard_on_s3_is_named_by_verify_and_by_the_readers(
    s3_env: pafs.S3FileSystem, on_s3: Path, tmp_path: Path
) -> None:
    ws = tmp_path / "corrupt"
    shutil.copytree(on_s3, ws)
    meta = ShardMeta.read(str(ws / "data/shards"))
    victim = meta.shard_files("parquet")[0]
    path = victim.uri.removeprefix("s3://")
    with s3_env.open_input_file(path) as f:
        original = f.read()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern inside a page: same length
    try:
        with s3_env.open_output_stream(path) as f:
            f.write(bytes(data))
        quick = verify(ws, "--quick")  # lengths agree: only reading finds it
        assert quick.returncode == 0, quick.stdout
        bad = verify(ws)
        assert bad.returncode == 1 and f"BAD  {victim.uri}: SHA-256" in bad.stdout
        assert "7 of 8 shard files" in bad.stdout

        stats = subprocess.run(
            [sys.executable, "-m", "stages.stats"], cwd=ws, env=stage_env(), capture_output=True, text=True
        )
        assert stats.returncode != 0
        assert f"{victim.uri}: SHA-256" in stats.stderr and "rerun the shard stage" in stats.stderr

        with s3_env.open_output_stream(path) as f:
            f.write(bytes(data[:-100]))  # cut short: the quick check (training's) finds it too
        short = verify(ws, "--quick")
        assert short.returncode == 1
        assert f"{victim.uri}: {len(data) - 100} bytes, meta.json lists" in short.stdout
    finally:  # the module's other tests read the same store
        with s3_env.open_output_stream(path) as f:
            f.write(original)


def kill_session(leader: int) -> None:
    """SIGKILLs every process of the session `leader` started (the stage and its local Ray)."""
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader:
                proc.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass


@pytest.fixture(scope="module")
def clean_manifest(s3_server: S3Server, tiny_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """meta.json of an undisturbed shard stage of the tiny inputs into MANY_STORE."""
    overrides = {**MANY, "data": {"shard_store": MANY_STORE}}
    return meta_json(sharded_copy(tiny_inputs, tmp_path_factory.mktemp("clean"), overrides, s3_server))


MANY = {"shard": {"shard_size": 2}}  # 30 shard tasks: a fault lands while they write
MANY_STORE = f"{STORE}-clean"


def start_stage(ws: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.shard"], cwd=ws, env=stage_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_first_upload(fs: pafs.S3FileSystem, store: str, proc: subprocess.Popen) -> None:
    while not objects(fs, store.removeprefix("s3://")):
        assert proc.poll() is None, "the shard stage ended before writing to S3"


def same_as_clean(ws: Path, store: str, clean: dict) -> None:
    """The workspace's meta.json is the undisturbed run's, but for the store's name."""
    meta = meta_json(ws)
    meta["shards"] = json.loads(json.dumps(meta["shards"]).replace(store, MANY_STORE))
    assert meta == clean


def test_stage_killed_while_writing_to_s3_reruns_to_the_same_manifest(
    s3_env: pafs.S3FileSystem, workspace_copy, clean_manifest: dict
) -> None:
    store = f"{STORE}-killed"
    ws = workspace_copy("killed", {**MANY, "data": {"shard_store": store}})
    before = meta_json(ws)  # the local output of the tiny inputs: must stay until a new one is whole
    proc = start_stage(ws)
    try:
        wait_for_first_upload(s3_env, store, proc)
    finally:
        kill_session(proc.pid)
        proc.wait()
    assert meta_json(ws) == before  # nothing of the killed run is trusted
    run_stage(ws, "shard")
    same_as_clean(ws, store, clean_manifest)
    assert verify(ws).returncode == 0


def test_s3_server_lost_mid_stage_fails_cleanly_and_reruns_to_the_same_manifest(
    workspace_copy, clean_manifest: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"{STORE}-restart"
    ws = workspace_copy("restart", {**MANY, "data": {"shard_store": store}})
    before = meta_json(ws)
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = start_s3("127.0.0.1", tmp_path / "first")  # a server of its own, to stop mid-stage
    try:
        for key, value in first.env().items():
            monkeypatch.setenv(key, value)
        proc = start_stage(ws)
        fs = pafs.S3FileSystem(endpoint_override=first.endpoint, region=first.region)
        wait_for_first_upload(fs, store, proc)
    finally:
        remove_all((first.process,), ())
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and first.endpoint.split("//")[1] in err, err[-3000:]
    assert meta_json(ws) == before

    second = start_s3("127.0.0.1", tmp_path / "second")  # moto keeps nothing: a fresh, empty store
    try:
        for key, value in second.env().items():
            monkeypatch.setenv(key, value)
        run_stage(ws, "shard")
    finally:
        remove_all((second.process,), ())
    same_as_clean(ws, store, clean_manifest)
