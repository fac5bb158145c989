"""Where the pipeline's files live: local paths and URIs, reads, atomic writes, publishing.

Every params path (`data.*`) may be a local path or a URI that `pyarrow.fs` understands
(file://, s3://, gs://). Reads go through `resolve`/`read_bytes`, so a stage reads the
same way from a laptop's disk and from a cluster's object store. Writes are atomic: a
reader sees the old file or the whole new one (`atomic_write_bytes`), the old folder or
the whole new one (`publish_dir`), never a part.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.preflight import s3_endpoint


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Maps a local path or URI to a pyarrow filesystem and a path inside it.

    Filesystems are cached per scheme and bucket, so resolving many files of one root
    builds one client.

    Args:
        uri: A local path (made absolute) or a URI such as file:///x, s3://bucket/x.

    Returns:
        (filesystem, path inside it).
    """
    if "://" not in uri:
        return _filesystem("file://"), os.path.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return _filesystem("file://"), rest
    # pyarrow's object-store paths are "bucket/key", i.e. the URI without its scheme.
    return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), rest


@functools.cache
def _filesystem(root_uri: str) -> pafs.FileSystem:
    """Builds (once) the filesystem serving a scheme + bucket."""
    if root_uri == "file://":
        return pafs.LocalFileSystem()
    return pafs.FileSystem.from_uri(root_uri)[0]


def read_bytes(uri: str) -> bytes:
    """Reads a whole file given as a local path or URI."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return f.read()


def join(root: str, *parts: str) -> str:
    """Joins path parts (empty ones skipped) onto a root that may be a URI."""
    return "/".join([root.rstrip("/"), *(p for p in parts if p)])


def is_file(uri: str) -> bool:
    """Whether `uri` (local path or URI) is an existing regular file."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def absolute(path: str) -> str:
    """A params path in the form other processes can use: URIs as they are, local paths
    absolute (Ray workers and RunConfig.storage_path may run in another folder)."""
    return path if "://" in path else str(Path(path).resolve())


class NoSpaceError(OSError):
    """A write that does not fit on its filesystem (errno ENOSPC), naming the path and the
    bytes it needs."""


def require_space(path: str | Path, needed: int) -> None:
    """Fails before writing `needed` bytes to `path` (a local file or folder, which need not
    exist yet) when its filesystem has less free space than that.

    Raises:
        NoSpaceError: Naming the path, the bytes needed and the bytes free.
    """
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise NoSpaceError(errno.ENOSPC, _no_space(path, needed, free))


def _no_space(path: str | Path, needed: int, free: int) -> str:
    return f"{path}: no space left to write {needed:,} bytes ({free:,} bytes free on its filesystem)"


def _nbytes(data: bytes | memoryview | list[bytes]) -> int:
    if isinstance(data, list):
        return sum(len(piece) for piece in data)
    return memoryview(data).nbytes


def atomic_write_bytes(
    path: str | Path, data: bytes | memoryview | list[bytes], mode: int = 0o666, *, fsync: bool = True
) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it over `path`.

    Args:
        path: The file to write.
        data: Its whole content, or a list of pieces written one after the other (never
            joined into one copy).
        mode: Permission bits the file is created with (less the umask): 0o600 for files
            holding secrets, which are then never readable by others, not even briefly.
        fsync: False leaves making the bytes durable to the caller (`sync_paths`), for
            files that become visible only later, with a whole folder; the rename still
            guarantees that `path` never holds a partial file.

    Raises:
        NoSpaceError: The filesystem has less free space than `data` needs (checked first)
            or ran out while writing; the partial temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = _nbytes(data)
    require_space(path, needed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed writer keeps its old mode under O_CREAT
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, list):
                f.writelines(data)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno != errno.ENOSPC:
            raise
        # Free space checked above, then taken by another writer meanwhile.
        raise NoSpaceError(errno.ENOSPC, _no_space(path, needed, shutil.disk_usage(path.parent).free)) from e
    tmp.replace(path)


def write_file(uri: str, data: bytes | memoryview | list[bytes], *, fsync: bool = True) -> None:
    """Writes a whole file, local or on an object store, so that readers never see a part.

    Local paths go through `atomic_write_bytes` (`fsync` as there). On an object store an
    upload becomes visible only when it completes (pyarrow sends large ones as multipart
    uploads), so a writer that dies leaves no object, or the previous one, at `uri`.

    Args:
        uri: A local path or a URI.
        data: The whole content, or pieces written one after the other.
        fsync: Local files only; see `atomic_write_bytes`.
    """
    if not is_remote(uri):
        atomic_write_bytes(resolve(uri)[1], data, fsync=fsync)
        return
    fs, path = resolve(uri)
    try:
        with fs.open_output_stream(path) as f:
            for piece in data if isinstance(data, list) else [data]:
                f.write(piece)
    except OSError as e:
        raise OSError(f"{uri}: upload failed (endpoint: {s3_endpoint() or 'default'}): {e}") from e


def is_remote(uri: str) -> bool:
    """Whether `uri` names an object store (s3://, gs://, ...) rather than a local file."""
    return "://" in uri and not uri.startswith("file://")


def sync_paths(paths: Iterable[str | Path]) -> None:
    """fsyncs local files and folders (a folder's fsync makes the renames in it durable).

    Flushes what any process on this machine wrote to them and the disk does not hold yet
    (on NFS, a writer's close() has already sent its bytes to the server).
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str, mode: int = 0o666) -> None:
    """Text form of `atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode(), mode)


def publish_dir(staging: Path, out: Path) -> None:
    """Replaces `out` by the complete `staging` folder (two renames, then cleanup)."""
    old = out.parent / f".{out.name}.old"
    _remove(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    _remove(old)


def _remove(path: Path) -> None:
    """Deletes a file, link or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def exit_when_out_of_space() -> Iterator[None]:
    """For a stage's main: a NoSpaceError, however Ray wrapped it, ends the process with
    `error: <path>: no space left to write N bytes (M bytes free ...)` on stderr and exit
    status 1 instead of a traceback from inside a Ray worker."""
    try:
        yield
    except Exception as e:
        message = _no_space_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def _no_space_message(error: BaseException) -> str | None:
    """The message of the NoSpaceError behind `error`, wherever it was raised: here, in a
    Ray task (RayTaskError.cause) or in a Ray Train worker (WorkerGroupError.worker_failures,
    reached through the exceptions' `__cause__`); None when there is none."""
    todo = [error]
    while todo:
        e = todo.pop()
        if isinstance(e, NoSpaceError) and e.strerror:
            return e.strerror
        todo += [c for c in (e.__cause__, getattr(e, "cause", None)) if isinstance(c, BaseException)]
        todo += getattr(e, "worker_failures", {}).values()
    return None
