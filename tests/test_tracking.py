"""MLflow tracking helpers: fail-fast on an unreachable server, code and data version tags, the
experiment (created once, artifacts of a SQLite store beside it)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.tracking import dvc_out_hashes, git_tags, use_experiment
from tests.conftest import stage_env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on close: nothing listens there


def test_unreachable_tracking_server_fails_before_training(workspace_copy) -> None:
    ws = workspace_copy("unreachable")
    env = stage_env() | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}"}
    out = subprocess.run(
        [sys.executable, "-m", "stages.train"], cwd=ws, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0
    assert "MLflow tracking server http://127.0.0.1:" in out.stderr and "is unreachable" in out.stderr
    assert not (ws / "artifacts").exists(), "no training state may be written before the check"


def test_git_tags_report_commit_and_dirty_tree(tmp_path: Path) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run(["git", "add", "a.txt"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "a"], cwd=tmp_path, check=True)
    clean = git_tags(tmp_path)
    assert len(clean["git_commit"]) == 40 and clean["git_dirty"] == "false"
    (tmp_path / "a.txt").write_text("b")
    assert git_tags(tmp_path)["git_dirty"] == "true"


def test_dvc_out_hashes_read_the_lock_file(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    assert dvc_out_hashes("shard", lock) == {}
    lock.write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "shard": {
                        "outs": [
                            {
                                "path": "data/shards",
                                "md5": "0123456789abcdef0123456789abcdef.dir",
                                "nfiles": 9,
                            }
                        ]
                    }
                },
            }
        )
    )
    assert dvc_out_hashes("shard", lock) == {"data/shards": "0123456789abcdef0123456789abcdef.dir"}
    assert dvc_out_hashes("train", lock) == {}


def test_new_experiment_in_a_sqlite_store_keeps_artifacts_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The active experiment is this process's state (and MLFLOW_EXPERIMENT_ID): restored after.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    # Created from another folder, as a Ray job does in its own copy of the code.
    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path / "job")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = use_experiment("beside")
    assert use_experiment("beside") == experiment_id  # found, not created again
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    with mlflow.start_run() as run:  # the active experiment
        pass
    assert run.info.experiment_id == experiment_id
