"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text form of `atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def publish_dir(staging: Path, out: Path) -> None:
    """Replaces `out` by the complete `staging` folder (two renames, then cleanup)."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
