"""The whole pipeline through the real `dvc` CLI, tracked in a real MLflow store.

`dvc repro` on a tiny sample, a no-op second `dvc repro`, then `dvc exp run -S
train.lr=...`, which must rerun only train and evaluate; then MLflow must hold both runs
with their params, metrics and tags, and the registered model must predict exactly what
the final checkpoint does. Then `dvc push` to a DVC remote on a real S3 server and `dvc
pull` into a fresh clone, where `dvc repro` has nothing to do.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from cli.services import S3Server
from pipeline.train.model_card import load_model
from tests.conftest import NOISE, git_project, stage_env, tiny_params

STAGES = ("sample", "shard", "stats", "train", "evaluate")


def dvc(ws: Path, *args: str, timeout: float = 900) -> str:
    out = subprocess.run(
        ["dvc", *args], cwd=ws, env=stage_env(), capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", log))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git + DVC checkout of this project's files with the tiny params, MLflow's
    system metrics on as in the profiles (its console lines are checked)."""
    return git_project(tmp_path_factory.mktemp("project"), {"mlflow": {"system_metrics": True}})


def test_repro_then_noop_then_experiment(project: Path) -> None:
    ws = project
    first = dvc(ws, "repro")
    assert ran(first) == set(STAGES)
    assert [line for line in NOISE if line in first] == []
    for path in (
        "data/shards/meta.json",
        "data/stats.json",
        "artifacts/model/model.pt",
        "metrics/train.json",
        "metrics/eval.json",
        "plots/confusion.png",
        "plots/curves.png",
        "plots/per_class_error.csv",
        "plots/worst_classes.csv",
        "plots/confused_pairs.csv",
        "plots/train_history.csv",
    ):
        assert (ws / path).is_file(), path
    ev = json.loads((ws / "metrics/eval.json").read_text())
    assert 0.0 <= ev["top1_error"] <= 1.0 and ev["num_images"] == 3 * 4
    assert {"top1_error_10crop", "top5_error_10crop"} <= set(ev)
    # What `make run` prints after the repro.
    report = subprocess.run(
        [sys.executable, "-m", "cli.report"], cwd=ws, env=stage_env(), capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr[-4000:]
    assert re.search(rf"val top-1 error \(10-crop\) +{ev['top1_error_10crop']:.2%}\n", report.stdout)
    assert re.search(rf"val images +{ev['num_images']}\n", report.stdout)
    model_before = (ws / "artifacts/model/model.pt").stat().st_mtime_ns

    second = dvc(ws, "repro")
    assert ran(second) == set() and "up to date" in second
    assert (ws / "artifacts/model/model.pt").stat().st_mtime_ns == model_before

    exp = dvc(ws, "exp", "run", "-S", "train.lr=0.02")
    assert ran(exp) == {"train", "evaluate"}

    show = dvc(ws, "exp", "show", "--json")
    assert "top1_error_10crop" in show and "0.02" in show
    assert "top1_error" in dvc(ws, "metrics", "diff", "HEAD")
    plots = dvc(ws, "plots", "show", "--json")
    assert all(name in plots for name in ("train_history.csv", "worst_classes.csv", "confusion.png"))

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["alexnet"], order_by=["start_time ASC"])
    assert len(runs) == 2
    assert list(runs["params.train.lr"]) == [str(tiny_params()["train"]["lr"]), "0.02"]
    for _, run in runs.iterrows():
        assert run["metrics.eval_top1_error_10crop"] >= 0.0 and run["metrics.val_top1_error"] >= 0.0
        assert re.fullmatch(r"[0-9a-f]{40}", run["tags.git_commit"])
        assert re.fullmatch(r"[0-9a-f]{32}(\.dir)?", run["tags.dvc.shard.data/shards"])
    assert runs["tags.dvc_exp_name"].iloc[1], "the experiment's name is tagged"
    client = mlflow.MlflowClient()
    history = client.get_metric_history(runs["run_id"].iloc[1], "train_loss")
    assert sorted(m.step for m in history) == [1, 2]
    inputs = client.get_run(runs["run_id"].iloc[1]).inputs.dataset_inputs
    assert {d.dataset.name for d in inputs} == {"shards-train", "shards-val"}

    # The registered candidate is the last run's model: same predictions as its checkpoint.
    candidate = client.get_model_version_by_alias("alexnet", "candidate")
    assert candidate.run_id == runs["run_id"].iloc[1]
    registered = mlflow.pytorch.load_model("models:/alexnet@candidate")
    local, card = load_model(ws / "artifacts/model")
    x = torch.from_numpy(
        np.random.default_rng(0).normal(size=(4, 3, card.crop, card.crop)).astype(np.float32)
    )
    with torch.no_grad():
        expected = local(x)
        got = registered(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    champion = client.get_model_version_by_alias("alexnet", "champion")
    errors = [float(v) for v in runs["metrics.eval_top1_error_10crop"]]
    assert int(champion.version) == (2 if errors[1] < errors[0] else 1)


def test_remote_push_then_pull_into_a_fresh_clone_runs_nothing(
    project: Path, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After the test above: a repro'd workspace with an experiment applied.
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)  # the keys reach DVC through the environment only
    ws = project
    dvc(ws, "remote", "add", "-d", "storage", "s3://alexnet-dvc/cache")
    dvc(ws, "remote", "modify", "storage", "endpointurl", s3_server.endpoint)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run([*git, "commit", "-qm", "results and the remote"], cwd=ws, check=True)
    assert s3_server.secret_key not in (ws / ".dvc/config").read_text()
    pushed = dvc(ws, "push")
    assert re.search(r"\d+ files? pushed", pushed), pushed

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    assert not (clone / "artifacts/model/model.pt").exists()
    dvc(clone, "pull")
    for rel in ("data/shards/meta.json", "data/stats.json", "artifacts/model/model.pt", "metrics/eval.json"):
        assert (clone / rel).read_bytes() == (ws / rel).read_bytes(), rel
    again = dvc(clone, "repro")
    assert ran(again) == set() and "up to date" in again
