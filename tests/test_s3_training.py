"""Training and evaluation with everything in object storage (a real S3 server, moto's):
shards in `data.shard_store`, Ray Train's checkpoints and the run state in
`data.checkpoints` (RunConfig.storage_path); a driver interrupted mid-run resumes from the
checkpoints on S3, and evaluation reads the val shards from there.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pyarrow.fs as pafs

from tests.conftest import run_stage
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
