"""Submit pipeline stages as a Ray job to the cluster at RAY_ADDRESS.

    python -m cli.submit --params params-cluster.yaml train evaluate

The stages and their commands are dvc.yaml's, run in its order. The job's working dir is
a staging copy of the code the stages import (pipeline/, stages/, models/ and
pyproject.toml; no data, venvs, caches or checkpoints), with the chosen params file as
its params.yaml: Ray caps working-dir uploads at 100 MiB. Shards and checkpoints
are read and written where that params file says, which on a cluster must be shared
storage (an NFS path, or s3:// / gs:// URIs). The runtime env carries the pinned pip
dependencies from pyproject.toml (unless --no-pip: for clusters whose image has them)
and MLFLOW_TRACKING_URI, so the job tracks into the same server as you.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.cluster import use_token_auth_if_available
from pipeline.config import DataParams, load_params
from pipeline.tracking import DEFAULT_STORE

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

CODE_DIRS = ("pipeline", "stages", "models")
UPLOAD_LIMIT = 100 * 2**20  # Ray's working_dir cap
ROOT = Path(__file__).resolve().parents[1]


def pinned_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's pinned runtime dependencies, as pip requirement strings."""
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def shared_params(params_file: Path, cwd: Path) -> str:
    """`params_file`'s text with every relative `data` path made absolute against `cwd` (URIs,
    absolute paths and empty values, such as an unset `data.shard_store`, as they are)."""
    params = yaml.safe_load(params_file.read_text())
    data = params.setdefault("data", {})
    for f in dataclasses.fields(DataParams):
        value = data.get(f.name, f.default)
        if f.name != "format" and value and "://" not in value and not Path(value).is_absolute():
            data[f.name] = str(cwd / value)
    return yaml.safe_dump(params, sort_keys=False)


def stage_working_dir(params_file: Path, dest: Path, shared_cwd: Path | None = None) -> Path:
    """Copies the code that stages import plus `params_file` (as params.yaml) into `dest`;
    with `shared_cwd`, its relative data paths made absolute against that folder.

    Raises:
        ValueError: When the result would exceed Ray's 100 MiB working-dir cap.
    """
    for name in CODE_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    if shared_cwd is None:
        shutil.copy2(params_file, dest / "params.yaml")
    else:
        (dest / "params.yaml").write_text(shared_params(params_file, shared_cwd))
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    if size > UPLOAD_LIMIT:
        raise ValueError(f"job working dir is {size / 2**20:.0f} MiB, over Ray's 100 MiB upload cap")
    return dest


def runtime_env(working_dir: Path, pip: bool, shared_cwd: Path | None = None) -> dict[str, Any]:
    """The job's runtime env: code, dependencies, tracking URI (MLFLOW_TRACKING_URI, else with
    `shared_cwd` the SQLite store there that a stage run in that folder would use)."""
    env: dict[str, Any] = {"working_dir": str(working_dir), "env_vars": {}}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["env_vars"]["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    elif shared_cwd is not None:
        env["env_vars"]["MLFLOW_TRACKING_URI"] = f"sqlite:///{shared_cwd / DEFAULT_STORE}"
    if pip:
        env["pip"] = pinned_requirements()
    return env


def dvc_stages(dvc_file: Path = ROOT / "dvc.yaml") -> dict[str, str]:
    """The pipeline's stages as dvc.yaml declares them.

    Args:
        dvc_file: The DVC pipeline file.

    Returns:
        Stage name -> its ``cmd``, in the file's order (the pipeline order).

    Raises:
        ValueError: When the file has no stages or a stage has no single-string ``cmd``.
    """
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ValueError(f"{dvc_file}: expected a non-empty `stages` mapping")
    commands = {}
    for name, stage in stages.items():
        cmd = stage.get("cmd") if isinstance(stage, dict) else None
        if not isinstance(cmd, str) or not cmd.strip():
            raise ValueError(f"{dvc_file}: stages.{name}.cmd: expected one command string, got {cmd!r}")
        commands[name] = cmd
    return commands


def entrypoint(stages: list[str], commands: dict[str, str]) -> str:
    """Shell command running `stages` in pipeline order, stopping at the first failure.

    Args:
        stages: The stages to run, in any order.
        commands: Every stage's command in pipeline order (`dvc_stages`).

    Returns:
        The commands of `stages`, ordered as in `commands`, joined with ``&&``.
    """
    return " && ".join(cmd for name, cmd in commands.items() if name in stages)


def main(argv: list[str] | None = None) -> int:
    """Parses arguments, submits the job, and (unless --no-wait) follows it to the end."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = dvc_stages()
    parser.add_argument("stages", nargs="+", choices=list(commands), help="stages to run (dvc.yaml's)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file for the job")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        help="the dashboard's URL or the head's GCS address (default: RAY_API_SERVER_ADDRESS, "
        "else RAY_ADDRESS; Ray's job client lets those two override this)",
    )
    parser.add_argument("--no-pip", action="store_true", help="the cluster already has the dependencies")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument(
        "--shared-cwd",
        action="store_true",
        help="this folder is on storage every node sees at the same path (make cluster-up's "
        "cluster, a repo on NFS): relative data paths and the default SQLite tracking store "
        "are taken here, not in the job's own copy of the code",
    )
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("no cluster: set RAY_ADDRESS or pass --address (e.g. http://127.0.0.1:8265)")
    params = load_params(args.params)  # a bad params file fails here, before anything is uploaded
    use_token_auth_if_available()
    from ray.job_submission import JobStatus, JobSubmissionClient

    shared_cwd = Path.cwd() if args.shared_cwd else None
    local = [p for p in (params.data.shards, params.data.checkpoints) if "://" not in p]
    relative = [p for p in local if not Path(p).is_absolute()]
    if relative and shared_cwd is None:
        print(
            f"warning: {relative} are relative paths: the job resolves them inside its own "
            "working dir; use shared storage (absolute NFS paths or URIs) on a cluster, or "
            "--shared-cwd where this folder is shared",
            file=sys.stderr,
        )

    with tempfile.TemporaryDirectory(prefix="alexnet-job-") as tmp:
        staged = stage_working_dir(args.params, Path(tmp), shared_cwd)
        env = runtime_env(staged, pip=not args.no_pip, shared_cwd=shared_cwd)
        client = JobSubmissionClient(args.address)
        job_id = submit_when_ready(client, entrypoint(args.stages, commands), env)
    print(f"submitted {job_id} to {args.address}", flush=True)
    if args.no_wait:
        return 0
    return 0 if follow(client, job_id) == JobStatus.SUCCEEDED else 1


def submit_when_ready(
    client: JobSubmissionClient, command: str, env: dict[str, Any], wait_s: float = 120
) -> str:
    """Submits the job (uploading the working dir), waiting while a just-started cluster's
    job agent comes up: its dashboard answers before the agent takes jobs."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            print("waiting for the cluster's job agent...", file=sys.stderr, flush=True)
            time.sleep(1.0)


def follow(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """Streams the job's logs until it ends; returns its final JobStatus."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can close a moment before the status flips
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
