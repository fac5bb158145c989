"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o666) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it over `path`.

    Args:
        path: The file to write.
        data: Its whole content.
        mode: Permission bits the file is created with (less the umask): 0o600 for files
            holding secrets, which are then never readable by others, not even briefly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed writer keeps its old mode under O_CREAT
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def atomic_write_text(path: str | Path, text: str, mode: int = 0o666) -> None:
    """Text form of `atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode(), mode)
