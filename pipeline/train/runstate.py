"""Which Ray Train run a train stage continues, and which MLflow run goes with it.

A run is named `<train.run_name>-<key>`, the key hashing everything training depends on
(model and train params, the shards' meta.json, the stats JSON). Rerunning the stage after
an interruption finds the same name, so Ray Train resumes from its last checkpoint and the
same MLflow run continues; a run that completed is started afresh.
The run's state lives beside its checkpoints (`<storage>/<name>/pipeline_run.json`), on
any filesystem pyarrow understands, so a cluster resumes from shared storage too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline.storage import absolute

STATE_NAME = "pipeline_run.json"


def run_key(*parts: bytes | str | dict[str, Any]) -> str:
    """A short, stable hash of the inputs that define a training run."""
    h = hashlib.sha256()
    for part in parts:
        data = json.dumps(part, sort_keys=True) if isinstance(part, dict) else part
        h.update(data.encode() if isinstance(data, str) else data)
        h.update(b"\0")
    return h.hexdigest()[:12]


@dataclass
class RunState:
    """The state file of one named run."""

    storage: str
    name: str

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        fs, base = pafs.FileSystem.from_uri(absolute(self.storage))
        return fs, f"{base}/{self.name}"

    def read(self) -> dict[str, Any] | None:
        """The saved state, or None when the run has never started."""
        fs, run_dir = self._fs()
        path = f"{run_dir}/{STATE_NAME}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())

    def write(self, state: dict[str, Any]) -> None:
        """Saves the state atomically (write, then move over the old file)."""
        fs, run_dir = self._fs()
        fs.create_dir(run_dir, recursive=True)
        tmp = f"{run_dir}/{STATE_NAME}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(state, indent=1).encode())
        fs.move(tmp, f"{run_dir}/{STATE_NAME}")

    def reset(self) -> None:
        """Deletes the run's checkpoints and state, so the next fit starts from scratch."""
        fs, run_dir = self._fs()
        if fs.get_file_info(run_dir).type == pafs.FileType.Directory:
            fs.delete_dir(run_dir)
