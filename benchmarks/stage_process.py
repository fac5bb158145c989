"""A pipeline stage as its own driver process, as `dvc repro` runs it, for the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage_process(args: list[str], ws: Path, name: str) -> tuple[float, str]:
    """Runs a stage's command in workspace `ws` with this checkout's code and venv.

    RAY_ADDRESS and MLFLOW_TRACKING_URI are dropped, so a stage starts its own local Ray
    and tracks in its workspace unless the command itself sets them (e.g. by sourcing a
    cluster's env file).

    Args:
        args: The command, e.g. `["bash", "-c", "python -m stages.shard"]`.
        ws: The workspace (params.yaml, data/): the command's working directory.
        name: The stage, for the error message.

    Returns:
        (wall seconds, the command's stdout). Exits with the stage's output when it fails.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    began = time.perf_counter()
    out = subprocess.run(args, cwd=ws, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if out.returncode != 0:
        sys.exit(f"stage {name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return seconds, out.stdout
