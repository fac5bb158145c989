"""Finding a training checkpoint that loads, when the newest one may be damaged.

Ray Train writes each epoch's checkpoint to `<storage_path>/<run name>/epoch-NNNN/`
(`checkpoint_name`), and resumes from the newest one it registered. A disk that filled up,
a node lost while its file was copied to shared storage, or a truncated upload can leave
that newest `state.pt` unreadable; `resume_state` then goes on from the newest older one
that loads instead of failing on every restart, on a local or shared disk and on an object
store (read through its pyarrow filesystem) alike. An epoch trained again after such a
fallback is saved as `epoch-NNNN-rK`: Ray Train still keeps the damaged `epoch-NNNN`, and
two registered checkpoints sharing a folder would have Ray delete the good one with the
bad.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from pipeline.storage import require_space

STATE_FILE = "state.pt"  # in every checkpoint folder: weights, optimizer, schedule, history
CHECKPOINT_DIR = re.compile(r"epoch-(\d+)(?:-r(\d+))?")
# What torch.load raises on a truncated, empty or overwritten file, or a missing one.
LOAD_ERRORS = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile)


@dataclass(frozen=True)
class Resume:
    """Where a resumed worker starts.

    Attributes:
        state: The loaded state file (pipeline.train.loop.save_state's dict).
        taken: Checkpoint folder names present in the run folder, which new checkpoints
            must not reuse (`checkpoint_name`).
    """

    state: dict[str, Any]
    taken: frozenset[str]


def _order(name: str) -> tuple[int, int]:
    """(epoch, retry) of a checkpoint folder name: later retries of an epoch are newer."""
    m = CHECKPOINT_DIR.fullmatch(name)
    return int(m.group(1)), int(m.group(2) or 0)


def checkpoint_name(epoch: int, taken: Collection[str]) -> str:
    """The folder name of epoch `epoch`'s checkpoint: `epoch-NNNN`, or `epoch-NNNN-rK` with the
    smallest K >= 1 not in `taken` when a (damaged) checkpoint of that epoch is still kept."""
    name, retry = f"epoch-{epoch:04d}", 0
    while name in taken:
        retry += 1
        name = f"epoch-{epoch:04d}-r{retry}"
    return name


def checkpoint_dirs(run_dir: str | Path, filesystem: pafs.FileSystem | None = None) -> list[Path]:
    """The run's checkpoint folders on `filesystem` (default: local), newest (highest epoch,
    then retry) first; paths in `filesystem`'s form (`bucket/key` on an object store)."""
    fs = filesystem or pafs.LocalFileSystem()
    infos = fs.get_file_info(pafs.FileSelector(str(run_dir), allow_not_found=True))
    found = [
        Path(i.path)
        for i in infos
        if i.type == pafs.FileType.Directory and CHECKPOINT_DIR.fullmatch(i.base_name)
    ]
    return sorted(found, key=lambda p: _order(p.name), reverse=True)


def _shown(path: Path, fs: pafs.FileSystem) -> str:
    """`path` as users name it: a local path, or a URI on an object store (s3://bucket/key)."""
    return str(path) if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


def load_state(checkpoint_dir: str | Path, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """Reads a training checkpoint (tensors and plain data only: weights_only=True) from a
    local folder or, with `filesystem`, a folder of that filesystem (an object store's)."""
    with (filesystem or pafs.LocalFileSystem()).open_input_file(f"{checkpoint_dir}/{STATE_FILE}") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def _problem(folder: Path, fs: pafs.FileSystem) -> tuple[dict[str, Any] | None, str | None]:
    """(the folder's state, None) when it loads and holds its epoch, else (None, why not)."""
    try:
        state = load_state(folder, fs)
    except LOAD_ERRORS as e:
        return None, f"{type(e).__name__}: {e}"
    if isinstance(state, dict) and state.get("epoch") == _order(folder.name)[0]:
        return state, None
    return None, "not this epoch's state"


def newest_valid_checkpoint(
    run_dir: str | Path, older_than: str | None = None, filesystem: pafs.FileSystem | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint folder of a run whose state file loads (tensors only) and
    holds the epoch its name says, with that state.

    Each newer folder that fails is skipped with a RuntimeWarning naming its file and the
    reason, so the log says which epochs are retrained.

    Args:
        run_dir: The Ray Train run's folder, `<data.checkpoints>/<run name>`.
        older_than: Only folders older than this checkpoint folder name.
        filesystem: Where `run_dir` is (default: local); an object store's paths are `bucket/key`.

    Returns:
        (folder, state), or None when the run has no loadable checkpoint (or no folder yet).
    """
    fs = filesystem or pafs.LocalFileSystem()
    for folder in checkpoint_dirs(run_dir, fs):
        if older_than is not None and _order(folder.name) >= _order(older_than):
            continue
        state, problem = _problem(folder, fs)
        if problem is None:
            return folder, state
        warnings.warn(
            f"{_shown(folder / STATE_FILE, fs)}: unreadable checkpoint ({problem}); trying the one before it",
            RuntimeWarning,
            stacklevel=2,
        )
    return None


def resume_state(path: str, filesystem: pafs.FileSystem) -> Resume:
    """The state a restarted worker resumes from: Ray Train's latest checkpoint when it
    loads, else the newest older one that does, with a RuntimeWarning naming the damaged
    file and the folder used instead; on local storage and on object stores alike.

    Args:
        path: Ray Train's latest checkpoint folder (`Checkpoint.path`).
        filesystem: Its filesystem (`Checkpoint.filesystem`).

    Raises:
        RuntimeError: No checkpoint of the run loads (naming the run folder).
    """
    latest = Path(path)
    run_dir = latest.parent
    taken = frozenset(p.name for p in checkpoint_dirs(run_dir, filesystem))
    state, problem = _problem(latest, filesystem)
    if problem is None:
        return Resume(state, taken)
    shown = _shown(latest / STATE_FILE, filesystem)
    warnings.warn(f"{shown}: unreadable checkpoint ({problem})", RuntimeWarning, stacklevel=2)
    found = newest_valid_checkpoint(run_dir, older_than=latest.name, filesystem=filesystem)
    if found is None:
        raise RuntimeError(
            f"{_shown(run_dir, filesystem)}: no checkpoint of this run loads; delete the folder to start over"
        )
    folder, state = found
    warnings.warn(
        f"resuming from {_shown(folder, filesystem)} (epoch {state['epoch']}) instead of the damaged "
        f"{_shown(latest, filesystem)}",
        RuntimeWarning,
        stacklevel=2,
    )
    return Resume(state, taken)


def require_checkpoint_space(state_dir: Path, name: str) -> None:
    """Fails before Ray Train copies a checkpoint into local (or mounted) run storage that
    lacks the room for it, so no half-copied checkpoint becomes the latest.

    Args:
        state_dir: The checkpoint's files, written to a local temporary folder.
        name: The checkpoint folder name in the run folder (`checkpoint_name`).

    Raises:
        pipeline.storage.NoSpaceError: Naming the checkpoint folder and the bytes needed.
    """
    import ray.train

    storage = ray.train.get_context().get_storage()
    if isinstance(storage.storage_filesystem, pafs.LocalFileSystem):
        needed = sum(f.stat().st_size for f in state_dir.iterdir())
        require_space(Path(storage.experiment_fs_path) / name, needed)
