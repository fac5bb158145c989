"""Long-running server processes we start and stop ourselves: spawn, wait until ready, stop.

Each server runs in its own session (its own process group), so stopping it reaches the
helpers it forks (uvicorn workers, PostgreSQL backends), and it outlives the command that
started it (`python -m cli.services up` returns while the servers run). A process is
identified by its pid *and* its start time, so a pid the kernel recycled after the server
exited is never signalled.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

LOG_TAIL_CHARS = 3000


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message names it and its log."""


@dataclass(frozen=True)
class ProcessRecord:
    """A server process we started, as recorded in a state file.

    Attributes:
        name: The service ("s3", "postgres", "mlflow").
        pid: Its pid, which is also its process-group id.
        create_time: psutil's start time of that pid (seconds since the epoch).
        stop_signal: The signal for a clean stop (SIGINT is PostgreSQL's fast shutdown).
        log: The file its stdout and stderr go to.
    """

    name: str
    pid: int
    create_time: float
    stop_signal: int
    log: Path

    def to_json(self) -> dict[str, object]:
        """The record as JSON-ready values."""
        return {**self.__dict__, "log": str(self.log)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ProcessRecord:
        """Inverse of `to_json`."""
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),  # type: ignore[arg-type]
            create_time=float(data["create_time"]),  # type: ignore[arg-type]
            stop_signal=int(data["stop_signal"]),  # type: ignore[arg-type]
            log=Path(str(data["log"])),
        )


@dataclass(frozen=True)
class RunAs:
    """An unprivileged account to run a server as (PostgreSQL refuses to run as root)."""

    user: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, user: str) -> RunAs | None:
        """The account `user` when we are root, else None (then servers run as ourselves).

        Raises:
            ServiceError: When we are root and `user` does not exist.
        """
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(user)
        except KeyError as e:
            raise ServiceError(
                f"user {user!r} to run PostgreSQL as does not exist: create it or pick another"
            ) from e
        return cls(user, entry.pw_uid, entry.pw_gid)

    def popen_kwargs(self) -> dict[str, object]:
        """subprocess.Popen arguments that drop to this account, without root's groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str],
    stop_signal: int = signal.SIGTERM,
    run_as: RunAs | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen, ProcessRecord]:
    """Starts `argv` in a new session with stdout and stderr appended to `log`.

    Returns:
        The Popen (to notice an early exit while waiting) and its record.
    """
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            **(run_as.popen_kwargs() if run_as else {}),  # type: ignore[arg-type]
        )
    record = ProcessRecord(name, proc.pid, psutil.Process(proc.pid).create_time(), int(stop_signal), log)
    return proc, record


def log_tail(log: Path) -> str:
    """The end of a service's log, for error messages."""
    try:
        return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return "(no log)"


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen, record: ProcessRecord, timeout_s: float
) -> None:
    """Polls `ready()` until it holds.

    Raises:
        ServiceError: When the process exits first or `timeout_s` passes, with its log's tail.
    """
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise ServiceError(
                f"{record.name} exited with status {proc.returncode} while starting; "
                f"{record.log}:\n{log_tail(record.log)}"
            )
        if time.monotonic() > deadline:
            raise ServiceError(
                f"{record.name} (pid {record.pid}) was not ready after {timeout_s:.0f} s; "
                f"{record.log}:\n{log_tail(record.log)}"
            )
        time.sleep(0.1)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group(record: ProcessRecord) -> list[psutil.Process]:
    """The recorded process and its descendants, or [] when that process is gone."""
    try:
        leader = psutil.Process(record.pid)
        # Start times are rounded differently across reads: equal within 10 ms is the same process.
        if abs(leader.create_time() - record.create_time) > 0.01:
            return []
        return [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def is_running(record: ProcessRecord) -> bool:
    """Whether the recorded process itself still runs (not exited, reaped or not, nor a
    later process that reuses its pid)."""
    group = _group(record)
    return bool(group) and _alive(group[0])


def stop_processes(records: Iterable[ProcessRecord], timeout_s: float = 30.0) -> None:
    """Stops each recorded server and everything it forked, in the order given.

    Sends the record's stop signal to its process group, waits up to `timeout_s`, then
    SIGKILLs what is left. Processes already gone are skipped.
    """
    for record in records:
        procs = _group(record)
        if not procs:
            continue
        try:
            os.killpg(record.pid, record.stop_signal)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout_s
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in procs:
            if _alive(p):
                p.kill()
        psutil.wait_procs([p for p in procs if _alive(p)], timeout=10)
