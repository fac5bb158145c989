"""Fail-fast checks of S3 and database settings against a real moto S3 server and a real
PostgreSQL: each bad configuration fails with a message naming the setting and what to check.

Each check is bounded by the timeouts and retry limit in pipeline.preflight (at most 16 s
for S3, 5 s for a database connection), not by a timed assert here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.postgres import PostgresServer
from cli.services import S3Server
from pipeline.preflight import PreflightError, check_database, check_storage
from pipeline.tracking import check_tracking_server
from tests.conftest import ROOT, stage_env, write_params


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on close: nothing listens there


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The environment `cli.services` writes for the S3 server, set for one test."""
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts TCP connections (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_good_settings_pass(s3_env: S3Server) -> None:
    check_storage(
        {"data.shards": "s3://alexnet/shards", "data.model": "s3://alexnet-dvc/model", "data.raw": "/x"}
    )


def test_wrong_secret_key_names_the_setting_and_the_credentials(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x" * 40)
    with pytest.raises(PreflightError) as e:
        check_storage({"data.shards": "s3://alexnet/shards"})
    message = str(e.value)
    assert message.startswith(
        f"data.shards=s3://alexnet/shards: S3 at endpoint {s3_env.endpoint} (AWS_ENDPOINT_URL)"
    )
    assert "rejected the credentials" in message and "AWS_SECRET_ACCESS_KEY" in message


def test_unknown_access_key_is_rejected(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    with pytest.raises(
        PreflightError, match=r"data\.checkpoints=s3://alexnet/ckpt: .* rejected the credentials"
    ):
        check_storage({"data.checkpoints": "s3://alexnet/ckpt"})


def test_half_set_credentials_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")  # were it to connect
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(PreflightError, match="AWS_SECRET_ACCESS_KEY is not set while its partner is"):
        check_storage({"data.shards": "s3://alexnet/shards"})


def test_missing_bucket_is_named(s3_env: S3Server) -> None:
    with pytest.raises(PreflightError) as e:
        check_storage({"data.shards": "s3://alexnet/shards", "data.stats": "s3://no-such-bucket/stats.json"})
    assert str(e.value) == (
        f"data.stats=s3://no-such-bucket/stats.json: bucket 'no-such-bucket' does not exist at endpoint "
        f"{s3_env.endpoint} (AWS_ENDPOINT_URL): create it, or correct data.stats."
    )


def test_refused_endpoint_is_unreachable(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(
        PreflightError, match=rf"S3 at endpoint {endpoint} .* is unreachable: check AWS_ENDPOINT_URL"
    ):
        check_storage({"data.shards": "s3://alexnet/shards"})


def test_endpoint_that_never_answers_fails_on_the_request_timeout(
    s3_env: S3Server, silent_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent_port}")
    with pytest.raises(PreflightError, match=r"is unreachable: .*(Timeout|too slow)"):
        check_storage({"data.raw": "s3://alexnet/raw"})


def test_database_wrong_password_is_named_and_redacted(postgres_server: PostgresServer) -> None:
    pg = postgres_server
    uri = f"postgresql+psycopg2://{pg.user}:wrong-password@{pg.host}:{pg.port}/{pg.database}"
    with pytest.raises(PreflightError) as e:
        check_database(uri, "MLFLOW_TRACKING_URI")
    message = str(e.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI=postgresql+psycopg2://{pg.user}:***@{pg.host}:{pg.port}/")
    assert "password authentication failed" in message and "wrong-password" not in message


def test_database_password_from_the_passfile_logs_in(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(postgres_server.passfile))
    check_tracking_server(postgres_server.uri)


def test_unreachable_database_as_tracking_uri() -> None:
    uri = f"postgresql://mlflow@127.0.0.1:{closed_port()}/mlflow"
    with pytest.raises(
        PreflightError, match=rf"MLFLOW_TRACKING_URI={uri}: cannot log in .*Connection refused"
    ):
        check_tracking_server(uri)


def test_database_that_never_answers_fails_on_the_connect_timeout(silent_port: int) -> None:
    uri = f"postgresql://mlflow@127.0.0.1:{silent_port}/mlflow"
    with pytest.raises(PreflightError, match=rf"MLFLOW_TRACKING_URI={uri}: cannot log in .*timeout expired"):
        check_tracking_server(uri)


def test_shard_stage_stops_on_a_missing_bucket_before_ray_starts(s3_env: S3Server, tmp_path: Path) -> None:
    write_params(tmp_path, {"data": {"raw": "s3://no-such-bucket/ILSVRC2012"}})
    out = subprocess.run(
        [sys.executable, "-m", "stages.shard"],
        cwd=tmp_path,
        env=stage_env() | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert (
        "PreflightError: data.raw=s3://no-such-bucket/ILSVRC2012: bucket 'no-such-bucket' does not exist"
        in out.stderr
    )
    assert "Started a local Ray instance" not in out.stderr
    assert not (tmp_path / "data").exists()
