"""Running several paths side by side on a machine other users share (peers_write/peers_read).

Each path runs in every round, the order rotated round by round, so no path always gets
the quiet or the busy slot; a path's best run counts. Beside images/s, every run reports
the CPU seconds all its processes spent (`peers_env.cpu_seconds`): on a shared machine
the rates move with the other users' load, the CPU spent per image much less.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    """One timed pass of one path."""

    images: int
    seconds: float
    cpu: float  # CPU seconds of every process of the path during the pass

    @property
    def rate(self) -> float:
        """Images/s."""
        return self.images / self.seconds

    @property
    def cpu_ms(self) -> float:
        """CPU milliseconds per image."""
        return 1e3 * self.cpu / self.images


def load() -> str:
    """The load average (1, 5, 15 min), for the log."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_rounds(paths: dict[str, Callable[[], list[Run]]], rounds: int) -> dict[str, list[Run]]:
    """Runs every path once per round, in rotated order; returns each path's runs."""
    runs: dict[str, list[Run]] = {name: [] for name in paths}
    names = list(paths)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            got = paths[name]()
            runs[name] += got
            shown = ", ".join(f"{x.rate:.0f} ({x.cpu_ms:.2f} ms CPU/img)" for x in got)
            print(f"  round {r + 1}: {name}: {shown} images/s (load avg: {load()})", flush=True)
    return runs


def best_rate(runs: list[Run]) -> float:
    """A path's best images/s over its runs (the one the other users' load slowed least)."""
    return max(r.rate for r in runs)


def report(runs: dict[str, list[Run]], ours: str, peers: list[str]) -> tuple[str, float]:
    """Prints each path's best images/s and median CPU per image.

    Returns:
        The fastest peer (best images/s) and ours' best images/s over that peer's.
    """
    best = {name: best_rate(rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        cpu = statistics.median(r.cpu_ms for r in rs)
        shown = ", ".join(f"{r.rate:.0f}" for r in rs)
        print(f"{name}: {best[name]:.1f} images/s (runs: {shown}); median {cpu:.3f} ms CPU per image")
    fastest = max(peers, key=best.get)
    leanest = min(peers, key=lambda p: statistics.median(r.cpu_ms for r in runs[p]))
    cpu_ratio = statistics.median(r.cpu_ms for r in runs[leanest]) / statistics.median(
        r.cpu_ms for r in runs[ours]
    )
    print(f"cpu_per_image_leanest_peer_over_ours: {cpu_ratio:.2f} ({leanest})")
    return fastest, best[ours] / best[fastest]
