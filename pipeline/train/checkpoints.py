"""Finding a training checkpoint that loads, when the newest one may be damaged.

Ray Train writes each epoch's checkpoint to `<storage_path>/<run name>/epoch-NNNN/`
(pipeline.train.loop's `checkpoint_dir_name`), and resumes from the newest one it
registered. A disk that filled up, a node lost while its file was copied to shared storage,
or a truncated upload can leave that newest `state.pt` unreadable; the run can still go on
from an older one instead of failing on every restart.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

CHECKPOINT_DIR = re.compile(r"epoch-(\d+)")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's `epoch-NNNN` checkpoint folders, newest (highest epoch) first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := CHECKPOINT_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True) if p.is_dir()]


def newest_valid_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of a run whose state file loads (tensors only) and
    holds the epoch its name says.

    Each newer folder that fails is skipped with a RuntimeWarning naming its file and the
    reason, so the log says which epochs are retrained.

    Args:
        run_dir: The Ray Train run's folder, `<data.checkpoints>/<run name>`.

    Returns:
        That folder, or None when the run has no loadable checkpoint (or no folder yet).
    """
    # Imported here: loop.py, which resumes from what this returns, may import this module.
    from pipeline.train.loop import STATE_FILE, load_state

    if not Path(run_dir).is_dir():
        return None
    for folder in checkpoint_dirs(run_dir):
        epoch = int(CHECKPOINT_DIR.fullmatch(folder.name).group(1))
        try:
            state = load_state(folder)
            problem = (
                None if isinstance(state, dict) and state.get("epoch") == epoch else "not this epoch's state"
            )
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            return folder
        warnings.warn(
            f"{folder / STATE_FILE}: unreadable checkpoint ({problem}); trying the one before it",
            RuntimeWarning,
            stacklevel=2,
        )
    return None
