"""Connecting a stage to Ray: the cluster at RAY_ADDRESS, else a fresh local instance."""

from __future__ import annotations

import os


def init_ray() -> None:
    """Starts or joins Ray once per process.

    With RAY_ADDRESS set (by the user, or by `ray job submit` for the job's driver) the
    stage joins that cluster; otherwise it starts its own local instance, never silently
    attaching to some other cluster running on the machine.
    """
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", include_dashboard=False)
    # Per-operator bars flood DVC's log; the stages print their own progress.
    DataContext.get_current().enable_progress_bars = False


def cluster_cpus() -> int:
    """The Ray cluster's CPUs (at least 1), joining or starting Ray first (`init_ray`)."""
    import ray

    init_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
