"""The peers' own environment: a second venv holding litdata, mosaicml-streaming and webdataset.

The peers are never dependencies of ours, and mosaicml-streaming 0.13.0 requires
numpy < 2.2, below the project's pin, so they cannot live in the project's venv.
`peers_python` creates (once; cached and git-ignored) `.peers-venv/` at the repository
root with the pinned peers plus what our per-image function and augmentation import,
at the project's own pins (read from pyproject.toml; numpy is left to the resolver).
`run_peer` calls one function of a benchmarks module in a subprocess of that venv with
this checkout first on its path, so the peers run the same `pipeline` code as we do.

This module imports only the standard library at its top: it is also the entry point of
that subprocess (`python -m benchmarks.peers_env CALL.json RESULT.json`).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".peers-venv"
PEERS = ("litdata==0.2.76", "mosaicml-streaming==0.13.0", "webdataset==1.0.2")
# What pipeline.data.preprocess and pipeline.transforms import (ray and pyarrow come in
# with ColorStats, whose module runs the stats job), and psutil for `cpu_seconds`, at the
# project's pins, without extras.
SHARED = ("torch", "torchvision", "simplejpeg", "pillow", "pyarrow", "ray", "psutil")
# No update checks or telemetry from the peers: the benchmark talks to nothing.
QUIET = {"LITDATA_DISABLE_VERSION_CHECK": "1", "DO_NOT_TRACK": "1"}


def requirements() -> list[str]:
    """The peers' venv contents: PEERS plus SHARED at pyproject.toml's pins."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        name, exact, version = dep.partition("==")
        if exact:
            pins[name.split("[")[0].lower()] = f"{name.split('[')[0]}=={version}"
    missing = [name for name in SHARED if name not in pins]
    if missing:
        raise KeyError(f"pyproject.toml pins no {missing}; the peers' venv needs them")
    return [*PEERS, *(pins[name] for name in SHARED)]


def peers_python() -> Path:
    """The peers' venv interpreter, creating or updating the venv first when needed.

    The venv records what it was built from in `requirements.json`; a venv built from
    other pins (or a half-built one, which has no such file) is rebuilt.
    """
    wanted = requirements()
    stamp = VENV / "requirements.json"
    python = VENV / "bin" / "python"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted and python.exists():
        return python
    print(f"building {VENV} with {' '.join(wanted)} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # pip sees only the venv
    subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], env=env, check=True)
    stamp.write_text(json.dumps(wanted))  # last: an interrupted build is redone
    return python


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and all its descendants.

    Living descendants as psutil reads them (with the children they reaped), exited ones
    as the kernel charged them to this process (RUSAGE_CHILDREN), so the difference of two
    readings is what a path spent in between, whichever processes it started or ended:
    on a shared machine a rate depends on the other users' load, this much less.
    """
    import resource

    import psutil

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited since the listing: charged to its parent by now
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def run_peer(module: str, function: str, **kwargs: Any) -> Any:
    """Calls `benchmarks.<module>.<function>(**kwargs)` in the peers' venv; returns its result.

    Args:
        module: Module name under benchmarks/.
        function: Function in it; it takes JSON-able keyword arguments and returns a
            JSON-able result.
        **kwargs: Its arguments.

    Raises:
        subprocess.CalledProcessError: The call failed (its traceback is on stderr).
    """
    python = peers_python()
    env = {**os.environ, **QUIET, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="peers-call-") as tmp:
        call, result = Path(tmp) / "call.json", Path(tmp) / "result.json"
        call.write_text(json.dumps({"module": module, "function": function, "kwargs": kwargs}))
        command = [str(python), "-m", "benchmarks.peers_env", str(call), str(result)]
        subprocess.run(command, env=env, check=True)
        return json.loads(result.read_text())


def main(argv: list[str]) -> None:
    """Subprocess side of `run_peer`: argv = [CALL.json, RESULT.json]."""
    call = json.loads(Path(argv[0]).read_text())
    fn = getattr(importlib.import_module(f"benchmarks.{call['module']}"), call["function"])
    Path(argv[1]).write_text(json.dumps(fn(**call["kwargs"])))


if __name__ == "__main__":
    main(sys.argv[1:])
