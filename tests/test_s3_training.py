"""Training and evaluation with everything in object storage (a real S3 server, moto's):
shards in `data.shard_store`, Ray Train's checkpoints and the run state in
`data.checkpoints` (RunConfig.storage_path); a driver interrupted mid-run resumes from the
checkpoints on S3, and evaluation reads the val shards from there. Two trainings log to
one `mlflow server` (PostgreSQL, artifacts on S3) at once, and the registered model loads
from the artifact store.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import yaml
from mlflow import MlflowClient

from cli.services import ServicesInfo
from pipeline.train.model_card import load_model
from tests.conftest import run_stage, stage_env
from tests.test_training import epoch_steps, start_training, wait_for

CHECKPOINTS = "alexnet/train-checkpoints"


def registered(fs: pafs.S3FileSystem) -> int:
    """Checkpoints Ray Train's controller has recorded on S3 (see test_training.registered)."""
    infos = fs.get_file_info(pafs.FileSelector(CHECKPOINTS, recursive=True, allow_not_found=True))
    for info in infos:
        if info.base_name == "checkpoint_manager_snapshot.json":
            try:
                with fs.open_input_file(info.path) as f:
                    return len(json.loads(f.read())["checkpoint_results"])
            except (OSError, ValueError, KeyError):  # replaced meanwhile
                return 0
    return 0


def test_interrupted_training_resumes_from_checkpoints_on_s3(
    s3_env: pafs.S3FileSystem, workspace_copy
) -> None:
    ws: Path = workspace_copy(
        "s3",
        {
            "data": {"shard_store": "s3://alexnet/train-shards", "checkpoints": f"s3://{CHECKPOINTS}"},
            "train": {"epochs": 4},
        },
    )
    run_stage(ws, "shard")  # the shards move to S3; stats are unchanged (same bytes)
    proc = start_training(ws)
    wait_for(lambda: registered(s3_env) >= 1, proc, "a checkpoint registered on S3")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (ws / "artifacts/model/model.pt").exists()

    run_stage(ws, "train")
    summary = json.loads((ws / "metrics/train.json").read_text())
    assert summary["epochs_run"] == 4 and summary["restarts"] == 1  # resumed, not restarted
    assert epoch_steps(ws) == [1, 2, 3, 4]
    assert not (ws / "artifacts/checkpoints").exists()  # nothing of the run on local disk
    listing = s3_env.get_file_info(pafs.FileSelector(CHECKPOINTS))
    runs = {i.path for i in listing if i.type == pafs.FileType.Directory}
    assert len(runs) == 1
    epochs = s3_env.get_file_info(pafs.FileSelector(runs.pop()))
    assert {"pipeline_run.json", "epoch-0004"} <= {i.base_name for i in epochs}

    run_stage(ws, "evaluate")  # the val shards from S3
    assert json.loads((ws / "metrics/eval.json").read_text())["num_images"] == 12


def test_two_trainings_at_once_on_one_tracking_server(
    services: ServicesInfo, workspace_copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The teams' setup: `mlflow server` on PostgreSQL, artifacts proxied to S3. This test is
    # a client too, with what services.env gives users.
    for key, value in services.env().items():
        monkeypatch.setenv(key, value)
    env = stage_env() | services.env()
    spaces = [workspace_copy(name, {"train": {"lr": lr}}) for name, lr in (("a", 0.01), ("b", 0.02))]
    procs = [
        subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=ws, env=env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for ws in spaces
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]

    client = MlflowClient(tracking_uri=services.mlflow.uri)
    runs = client.search_runs([client.get_experiment_by_name("alexnet").experiment_id])
    assert len(runs) == 2
    for ws in spaces:
        run_id = json.loads((ws / "metrics/train.json").read_text())["mlflow_run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        lr = yaml.safe_load((ws / "params.yaml").read_text())["train"]["lr"]
        assert run.data.params["train.lr"] == str(lr)
        assert sorted(m.step for m in client.get_metric_history(run_id, "val_top1_error")) == [1, 2]

    evaluate = subprocess.run(
        [sys.executable, "-m", "stages.evaluate"], cwd=spaces[1], env=env, capture_output=True, text=True
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    mlflow.set_tracking_uri(services.mlflow.uri)
    registered = mlflow.pytorch.load_model("models:/alexnet@candidate")  # from the S3 artifact store
    local, card = load_model(spaces[1] / "artifacts/model")
    x = np.random.default_rng(0).normal(size=(2, 3, card.crop, card.crop)).astype(np.float32)  # (2, 3, H, W)
    x = torch.from_numpy(x)
    with torch.no_grad():
        torch.testing.assert_close(registered(x), local(x), rtol=1e-5, atol=1e-5)
