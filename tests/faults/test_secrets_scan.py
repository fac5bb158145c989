"""No secret from the environment is written anywhere: the train and evaluate stages run
through the real `dvc` CLI with the S3 server's access key pair, the PostgreSQL password
inside MLFLOW_TRACKING_URI (the stages track straight into the database) and a Ray token in
the environment; then every file of the workspace (dvc.lock, params, metrics, plots, model,
checkpoints, MLflow's artifact store), the stages' output, the Ray session's logs, and every
MLflow param, tag and artifact of the runs are searched for each secret.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cli.postgres import PostgresServer
from cli.services import S3Server
from tests.conftest import copy_project, stage_env, write_params


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short RAY_TMPDIR (Ray's socket paths must fit in 107 characters), removed after."""
    path = Path(tempfile.mkdtemp(prefix="rs"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def files_holding(root: Path, needles: dict[str, bytes]) -> list[tuple[str, str]]:
    """(file, secret name) for every file under root that contains a secret."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [(str(path), name) for name, value in needles.items() if value in data]
    return found


def test_no_secret_reaches_files_logs_or_mlflow(
    s3_server: S3Server, postgres_server: PostgresServer, tiny_inputs: Path, tmp_path: Path, ray_tmp: Path
) -> None:
    ws = copy_project(tmp_path / "ws")
    for rel in ("data", "metrics"):  # the sample, shard and stats outputs
        shutil.copytree(tiny_inputs / rel, ws / rel, dirs_exist_ok=True)
    write_params(ws, {"train": {"epochs": 1}})
    (ws / "dvc.lock").unlink(missing_ok=True)

    pg, s3 = postgres_server, s3_server
    tracking = f"postgresql+psycopg2://{pg.user}:{pg.password}@{pg.host}:{pg.port}/{pg.database}"
    ray_token = "raytoken" + secrets.token_hex(24)
    env = stage_env() | s3.env() | {"MLFLOW_TRACKING_URI": tracking, "RAY_AUTH_TOKEN": ray_token}
    env |= {"RAY_TMPDIR": str(ray_tmp), "MLFLOW_DISABLE_TELEMETRY": "true"}
    needles = {
        "AWS_ACCESS_KEY_ID": s3.access_key.encode(),
        "AWS_SECRET_ACCESS_KEY": s3.secret_key.encode(),
        "database password": pg.password.encode(),
        "RAY_AUTH_TOKEN": ray_token.encode(),
    }
    assert all(len(v) >= 16 for v in needles.values())  # long enough never to occur by chance

    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for argv in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "tiny profile"]):
        subprocess.run(argv, cwd=ws, check=True)
    # One dvc process reproduces both stages, in this order, without their upstream ones.
    argv = [shutil.which("dvc", path=env["PATH"]), "repro", "--single-item", "train", "evaluate"]
    out = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"dvc repro failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    log = out.stdout + out.stderr
    assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log, log[-3000:]
    assert "train:" in (ws / "dvc.lock").read_text() and "evaluate:" in (ws / "dvc.lock").read_text()

    assert [name for name, value in needles.items() if value.decode() in log] == []
    assert files_holding(ws, needles) == []
    assert list((ray_tmp / "ray").glob("session_*/logs/*"))  # the Ray logs searched exist
    assert files_holding(ray_tmp, needles) == []

    client = MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.tags.get("mlflow.runName", "").split("-")[0] for r in runs} >= {"alexnet"}
    for run in runs:
        values = [*run.data.params.items(), *run.data.tags.items()]
        leaked = [(k, name) for k, v in values for name, secret in needles.items() if secret.decode() in v]
        assert leaked == [], run.info.run_id
        artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        assert files_holding(artifacts, needles) == []
