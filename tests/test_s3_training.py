"""Training and evaluation with everything in object storage (a real S3 server, moto's):
shards in `data.shard_store`, Ray Train's checkpoints and the run state in
`data.checkpoints` (RunConfig.storage_path); a driver interrupted mid-run resumes from the
checkpoints on S3, past a damaged latest one, and evaluation reads the val shards from
there. Trainings log to one `mlflow server` (PostgreSQL, artifacts on S3) at once, each
into its own complete run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient

from cli.services import ServicesInfo
from tests.conftest import PACED_EPOCHS, ROOT, run_stage, stage_env
from tests.test_training import epoch_steps, wait_for

CHECKPOINTS = "alexnet/train-checkpoints"


@pytest.fixture
def s3_env(services: ServicesInfo, monkeypatch: pytest.MonkeyPatch) -> pafs.S3FileSystem:
    """conftest's `s3_env` on the S3 server of the module's `services`: one S3 server for
    the module."""
    for key, value in services.s3.env().items():
        monkeypatch.setenv(key, value)
    return pafs.S3FileSystem(endpoint_override=services.s3.endpoint, region=services.s3.region)


def snapshot(fs: pafs.S3FileSystem) -> dict:
    """Ray Train's controller's record of the run's checkpoints on S3 ({} before the first):
    what a restart resumes from (see test_training.registered)."""
    infos = fs.get_file_info(pafs.FileSelector(CHECKPOINTS, recursive=True, allow_not_found=True))
    for info in infos:
        if info.base_name == "checkpoint_manager_snapshot.json":
            try:
                with fs.open_input_file(info.path) as f:
                    return json.loads(f.read())
            except (OSError, ValueError):  # replaced meanwhile
                return {}
    return {}


def test_interrupted_training_resumes_on_s3_past_a_damaged_latest_checkpoint(
    s3_env: pafs.S3FileSystem, workspace_copy
) -> None:
    ws: Path = workspace_copy(
        "s3",
        {
            "data": {"shard_store": "s3://alexnet/train-shards", "checkpoints": f"s3://{CHECKPOINTS}"},
            "train": {"epochs": 5},
        },
    )
    run_stage(ws, "shard")  # the shards move to S3; stats are unchanged (same bytes)
    # Paced epochs: the Ctrl-C after the second checkpoint comes seconds before the fifth ends.
    argv = [sys.executable, "-m", "stages.train"]
    proc = subprocess.Popen(argv, cwd=ws, env=stage_env() | PACED_EPOCHS, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: len(snapshot(s3_env).get("checkpoint_results", [])) >= 2, proc, "two checkpoints on S3")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (ws / "artifacts/model/model.pt").exists()
    [run] = [
        i.path
        for i in s3_env.get_file_info(pafs.FileSelector(CHECKPOINTS))
        if i.type == pafs.FileType.Directory
    ]
    latest = snapshot(s3_env)["latest_checkpoint_result"]["checkpoint_dir_name"]  # what a resume loads
    epoch = int(latest.removeprefix("epoch-"))
    with s3_env.open_input_file(f"{run}/{latest}/state.pt") as f:
        head = f.read(4096)
    with s3_env.open_output_stream(f"{run}/{latest}/state.pt") as f:
        f.write(head)  # an upload cut short

    out = run_stage(ws, "train")
    log = out.stdout + out.stderr
    assert f"s3://{run}/{latest}/state.pt: unreadable checkpoint (" in log
    before = f"s3://{run}/epoch-{epoch - 1:04d} (epoch {epoch - 1})"
    assert f"resuming from {before} instead of the damaged s3://{run}/{latest}" in log
    summary = json.loads((ws / "metrics/train.json").read_text())
    assert summary["epochs_run"] == 5 and summary["restarts"] == 1  # resumed, not restarted
    assert epoch_steps(ws) == [1, 2, 3, 4, 5]
    assert not (ws / "artifacts/checkpoints").exists()  # nothing of the run on local disk
    names = {i.base_name for i in s3_env.get_file_info(pafs.FileSelector(run))}
    assert "pipeline_run.json" in names and any(n.startswith("epoch-0005") for n in names)

    run_stage(ws, "evaluate")  # the val shards from S3
    assert json.loads((ws / "metrics/eval.json").read_text())["num_images"] == 12


# Connects, says "ready", waits for the go line on stdin, then opens a run in the experiment.
OPEN_RUN = """
import sys, mlflow
from pipeline import tracking
tracking.connect()
print("ready", flush=True)
sys.stdin.readline()
with mlflow.start_run(experiment_id=tracking.use_experiment(sys.argv[1])) as run:
    pass
print(run.info.experiment_id)  # last: MLflow prints the run's address when it ends
"""


def test_processes_creating_one_experiment_at_once_share_it(services: ServicesInfo) -> None:
    # The first training on a fresh server creates the experiment: released together, these
    # processes race to create it (and its tag) on PostgreSQL; every run must land in it.
    env = stage_env() | services.env() | {"PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN_RUN, "shared"], env=env, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]  # fmt: skip
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-3000:]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-3000:] for _, err in results]
    experiment = MlflowClient(services.mlflow.uri).get_experiment_by_name("shared")
    assert {out.strip().splitlines()[-1] for out, _ in results} == {experiment.experiment_id}
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_two_pipelines_at_once_on_one_tracking_server(services: ServicesInfo, workspace_copy) -> None:
    # The teams' setup: `mlflow server` on PostgreSQL, artifacts proxied to S3; two trainings
    # and their evaluations (which register the model) at once.
    env = stage_env() | services.env()
    lrs = (0.01, 0.02)
    spaces = [workspace_copy(f"lr{lr}", {"train": {"lr": lr}}) for lr in lrs]
    both = f"{sys.executable} -m stages.train && {sys.executable} -m stages.evaluate"
    procs = [
        subprocess.Popen(["bash", "-c", both], cwd=ws, env=env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for ws in spaces
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]

    client = MlflowClient(tracking_uri=services.mlflow.uri)
    run_ids = [json.loads((ws / "metrics/train.json").read_text())["mlflow_run_id"] for ws in spaces]
    runs = client.search_runs([client.get_experiment_by_name("alexnet").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids) and len(set(run_ids)) == 2
    for ws, run_id, lr in zip(spaces, run_ids, lrs, strict=True):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["train.lr"] == str(lr)
        assert sorted(m.step for m in client.get_metric_history(run_id, "val_top1_error")) == [1, 2]
        assert "eval_top1_error_10crop" in run.data.metrics
        [version] = client.search_model_versions(f"name = 'alexnet' and run_id = '{run_id}'")
        assert json.loads((ws / "metrics/eval.json").read_text())["model_version"] == int(version.version)
