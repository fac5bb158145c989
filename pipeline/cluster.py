"""Connecting a stage to Ray: the cluster at RAY_ADDRESS, else a fresh local instance."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# Seconds to wait for the head's GCS port to accept a connection before calling it down.
HEAD_CONNECT_TIMEOUT_S = 10.0

# Worker processes a node keeps beyond its CPUs before it kills idle ones (see
# worker_pool_env): Ray Train's controller and its workers are processes too.
EXTRA_POOLED_WORKERS = 8


def init_ray(state_api: bool = False) -> None:
    """Starts or joins Ray once per process.

    With RAY_ADDRESS set (by the user, or by `ray job submit` for the job's driver) the
    stage joins that cluster, with Ray's token auth on when a token is at hand; otherwise it
    starts its own local instance, never silently attaching to some other cluster running on
    the machine.

    Args:
        state_api: Whether a local instance serves Ray's State API (see start_local_ray):
            what a process running Ray Train needs.

    Raises:
        RuntimeError: When nothing answers at RAY_ADDRESS (`_require_head`), or Ray made
            this process the driver of a node whose address is not one of this process's own
            (see `_require_own_node`).
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            _require_head(address)
            use_token_auth_if_available()
            ray.init(address=address)
            _require_own_node(address)
        else:
            start_local_ray(state_api=state_api)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data in this process without progress bars or its per-dataset log lines.

    Per-operator bars flood DVC's log, and the stages print their own progress. Ray Data's
    start, plan and end of every dataset (INFO) and its notice that bars are off (a
    WARNING, once per process) go; its other warnings and errors still print.
    """
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def start_local_ray(num_cpus: int | None = None, quiet: bool = False, state_api: bool = False) -> None:
    """Starts a fresh local Ray instance in this process, never joining a running cluster.

    The instance keeps the worker processes its stages use (`worker_pool_env`). Three
    settings keep Ray's console to what matters, without turning anything off that this
    instance uses:
    - RAY_AUTH_MODE=token, unless set: what Ray 2.60 does by default for a new local
      instance, set here so Ray does not print its notice that it did.
    - RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0, unless set: Ray Train's watcher polls for nodes
      being drained (spot preemption, autoscaler downscaling), which no node of a local
      instance ever is; its actor logged a constructor-arguments error line per run.
    - Ray Train's PlacementGroupCleaner (it removes a run's placement group when the
      controller dies) polls the State API: served by the dashboard's HTTP server, so
      with `state_api` the dashboard runs (on 127.0.0.1, a free port; without it: "Failed
      to query Ray Train Controller actor state" every few seconds), and found through RAY_ADDRESS,
      which the instance's workers get (the job's runtime_env) with the GCS on a port
      chosen here (RAY_GCS_SERVER_PORT; without it the State API looks for Ray on the
      machine and died with "Found multiple active Ray instances" wherever another ran).

    Args:
        num_cpus: CPUs Ray may schedule (default: the machine's), e.g. what a test or a
            benchmark measures on.
        quiet: Keep Ray's own logging and the workers' output off this process's console
            (tests and benchmarks print their own results).
        state_api: Start the dashboard, whose server answers the State API. Only Ray
            Train needs it; the other stages start without its nine processes.
    """
    import ray

    _set_local_defaults(num_cpus)
    port, dashboard = _ports_ray_leaves_alone(2)
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=state_api,
            dashboard_port=dashboard if state_api else None,
            configure_logging=not quiet,
            log_to_driver=not quiet,
            # Only with the State API: any job runtime_env keeps the job's tasks off the
            # worker processes Ray prestarts, so that Ray starts more of them.
            runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}} if state_api else None,
        )
    finally:
        if previous is None:
            del os.environ["RAY_GCS_SERVER_PORT"]
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


def worker_pool_env(cpus: int) -> dict[str, str]:
    """The environment setting with which a Ray node keeps its idle worker processes.

    A raylet kills an idle worker process after a second once it has more worker
    processes than its soft limit, by default its CPUs. Ray Train's controller and its
    training workers are long-lived actors that count towards that limit, so on a node
    with few CPUs the processes that ran an epoch's shard-reading tasks were killed
    between epochs, and every epoch began by starting new ones (Python, pyarrow) while
    the training workers waited for their first batch (README, "Two nodes against one").
    The limit becomes the CPUs plus EXTRA_POOLED_WORKERS, unless RAY_num_workers_soft_limit
    is set.

    Args:
        cpus: The CPUs the node offers.

    Returns:
        {"RAY_num_workers_soft_limit": ...}, for the node's environment at its start.
    """
    key = "RAY_num_workers_soft_limit"
    return {key: os.environ.get(key, str(cpus + EXTRA_POOLED_WORKERS))}


def _set_local_defaults(num_cpus: int | None) -> None:
    """RAY_AUTH_MODE=token, no preemption watcher and the worker pool's size, unless set
    (see start_local_ray)."""
    if "RAY_AUTH_MODE" not in os.environ:
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        # Ray caches its config at import: re-read it, as Ray does when it sets the mode itself.
        Config.initialize("")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.update(worker_pool_env(num_cpus or os.cpu_count() or 1))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ports_ray_leaves_alone(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports nothing listens on at `host` now, which Ray will not pick itself.

    Ray picks its other components' ports as free_port does (the kernel's pick from its
    ephemeral range) and its workers' from 10002-19999, and refuses to start when a port
    handed to it equals one of those ("Ray component dashboard is trying to use a port
    number ... used by other components"). These come from between the two (where the
    ephemeral range starts below 21000, from Linux's default gap, 20000-32767).
    """
    proc_range = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first_ephemeral = int(proc_range.read_text().split()[0]) if proc_range.exists() else 32768
    if first_ephemeral < 21000:
        first_ephemeral = 32768
    candidates = random.sample(range(20000, first_ephemeral), k=200)
    ports: list[int] = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports on {host} between 20000 and {first_ephemeral}")


def cluster_cpus() -> int:
    """The Ray cluster's CPUs (at least 1), joining or starting Ray first (`init_ray`)."""
    import ray

    init_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def node_cpus() -> int:
    """The CPUs this process's Ray node offers (its `num_cpus`), at most the cores this
    process may run on; at least 1.

    Threads a worker starts (torch's, the augmentation's) are sized by this rather than by
    the machine's cores: nodes that share one machine, or a node started with fewer CPUs
    than its host has, would otherwise each start a thread per core of the host.
    """
    import ray

    here = ray.get_runtime_context().get_node_id()
    offered = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == here), 0)
    return max(1, min(int(offered), len(os.sched_getaffinity(0))))


def spread_over_nodes(count: int) -> list[NodeAffinitySchedulingStrategy]:
    """Scheduling strategies that deal `count` tasks out to the cluster's live nodes in turn,
    as many per round as a node has CPUs (nodes a and b with 2 CPUs each: a, b, a, b, ...).

    Each is a soft node affinity: a task whose node is gone runs elsewhere (Ray's retry of a
    task lost with its node included), and a busy node makes its tasks wait rather than
    spill. Ray's own "SPREAD" and default strategies both let the first node with a free CPU
    take the tasks, which on a busy machine was the driver's node for every shard task.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = sorted((n["NodeID"], int(n["Resources"].get("CPU", 0))) for n in ray.nodes() if n["Alive"])
    slots = [node for _, node in sorted((k, node) for node, cpus in alive for k in range(cpus))]
    if not slots:
        raise RuntimeError(f"the Ray cluster has no live node with a whole CPU: {alive}")
    return [NodeAffinitySchedulingStrategy(slots[i % len(slots)], soft=True) for i in range(count)]


def use_token_auth_if_available() -> None:
    """Turns on Ray's token auth for this process when RAY_AUTH_MODE is unset and a token is at
    hand (RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token).

    Ray 2.60 applies this rule itself only to a local cluster it finds on its own, never to an
    explicit address (RAY_ADDRESS, a job client's), so joining a `ray start` cluster, which
    requires the token `ray start` stored, failed with InvalidAuthToken unless the user also
    knew to set RAY_AUTH_MODE=token. This applies Ray's own rule, including re-reading Ray's
    config when Ray is already imported.
    """
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _require_head(address: str) -> None:
    """Raises when RAY_ADDRESS is a host:port where no head accepts connections (down, or
    restarting): `ray.init` would retry for minutes, logging only GCS timeouts. "auto" and
    ray:// client addresses are left to Ray."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=HEAD_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RuntimeError(
            f"RAY_ADDRESS={address}: no Ray head answers there ({e}). Start (or restart) the "
            "cluster's head and rerun: for `make cluster-up`'s cluster, `make cluster-down` then "
            "`make cluster-up`; or unset RAY_ADDRESS to run on a local Ray instance."
        ) from e


def _require_own_node(address: str) -> None:
    """Raises when the node Ray attached this driver to has an address this process lacks.

    A driver attaches to a raylet it finds in the machine's process table and gives workers
    that node's address to call it back at. In another network namespace (or a container
    sharing the process table) that address is not this process's: tasks would run, and the
    first callback (resolving an object passed by reference) would hang forever.
    """
    import socket

    import psutil
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node_ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
    ip_families = (socket.AF_INET, socket.AF_INET6)
    own = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family in ip_families}
    if node_ip not in own:
        ray.shutdown()
        raise RuntimeError(
            f"RAY_ADDRESS={address}: Ray attached this driver to the node at {node_ip}, which is "
            f"not an address of this process's network (it has {sorted(own)}): workers could not "
            "reach it. Run the driver on a node of the cluster: for `make cluster-up`'s cluster, "
            "`source cluster.env` (its `python` runs on the head node); elsewhere submit a job "
            "(python -m cli.submit)."
        )
