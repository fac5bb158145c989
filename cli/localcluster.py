"""A real multi-node Ray cluster on this Linux machine, for tests and for trying the cluster
path before having a cluster (root only).

    python -m cli.localcluster up [--workers N] [--cpus-per-node C]    # make cluster-up
    source cluster.env && dvc repro                                      # stages join it
    python -m cli.localcluster down                                      # make cluster-down

Network. A private bridge holds the first address of a free /24 (the first 10.203.N.0/24 that
no route or address of the host overlaps, or --subnet); each Ray node (`head`, `w1`, `w2`, ...)
lives in its own network namespace with the next address, cabled to the bridge by a veth
pair. Each node is its own `ray start --block` in its namespace with its own --temp-dir (and
a cwd there), so Ray sees distinct nodes with distinct addresses, as on real hardware; they
share this machine's cores and disk. Ray's servers listen on every address of their
namespace, which is its bridge address and its own loopback; the namespaces have no route
past the bridge, and the host's end of the bridge is only reachable from them.

Drivers run on the head node. A Ray driver attaches to a raylet it finds among the machine's
processes and tells workers to call it back at that raylet's address (to resolve an object
passed by reference, for one). A driver in the host's namespace would attach to the head's
raylet (the process table is shared) but listen in the host's namespace, unreachable at the
head's address: small tasks run, and the first callback hangs forever. So drivers run where
they do on a real cluster, on the head node: cluster.env puts first on PATH a `python` that
runs the venv's python inside the head's namespace (`ip netns exec`); `dvc repro` runs its
stages with `python`, so every stage is a driver on the head node, and
`pipeline.cluster.init_ray` refuses, with a message, a driver whose node address is not its
own. Job clients (`cli.submit`) need no such thing: they talk HTTP to the head's
dashboard through the bridge. Not chosen: the head in the host's namespace on the bridge
address, or an extra driver-only node there (Ray's servers would listen on the host's
public interfaces too), and Ray Client (a proxy in which Ray Data and Ray Train do not run
as they do under a real driver, so the cluster tests would not test the real path).

Auth. Ray's token authentication is on: a fresh random token in <state>/auth_token (0600),
RAY_AUTH_MODE=token for every node. cluster.env exports RAY_ADDRESS (the GCS, which drivers
join), RAY_API_SERVER_ADDRESS (the dashboard, for job clients), RAY_AUTH_TOKEN_PATH and
RAY_AUTH_MODE, and the PATH above.

Storage. Every node sees this machine's disk at the same paths: the shared storage a real
cluster gets from NFS or object storage. The pipeline resolves relative params paths
against the driver's cwd before any task sees them; the raylets' cwd is their own temp dir,
so code that wrongly relied on a worker's cwd fails here as it would on real hardware.

Services. With `--services` (what `make cluster-up` runs) `up` also starts the shared
services of `cli.services` (moto's S3 server, PostgreSQL, an `mlflow server` on them) on
the bridge address, which the nodes reach and nothing off this machine does: every node's
Ray processes get the S3 settings in their environment (the shard tasks and Ray Train's
checkpoints write to S3), and cluster.env exports them with MLFLOW_TRACKING_URI for
drivers and clients. The secrets are in 0600 files of the 0700 state dir, never on a
command line.

Cleanup. Every namespace, link, temp dir and process is recorded in <state>/state.json
before it is created or right after it starts; `down` SIGTERMs the recorded `ray start`
processes and every process inside the nodes' namespaces (worker nodes first), SIGKILLs
what still runs after a deadline, deletes links, namespaces, temp dirs, the token,
cluster.env and the state, and does nothing when nothing is up. It never runs `ray stop`,
which would stop every Ray instance on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

from cli import netns, raynodes
from cli.procs import ServiceError, stop_processes
from cli.raynodes import Cluster
from cli.services import export_lines, load_state, remove_all, save_state, start_services
from pipeline.storage import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = ROOT / ".localcluster"
ENV_FILE = ROOT / "cluster.env"
STOP_GRACE_S = 5  # SIGTERM to SIGKILL: a head that has run training lets it pass


def _services_state(cluster: Cluster) -> Path:
    return Path(cluster.state_dir) / "services.json"


def _start_services(cluster: Cluster) -> dict[str, str]:
    """Starts the services on the bridge address; returns what cluster.env exports for them."""
    folder = Path(cluster.state_dir) / "services"
    folder.mkdir(mode=0o700)
    info = start_services(cluster.bridge_ip, folder)
    save_state(info, _services_state(cluster))
    node_env = raynodes.services_env_file(Path(cluster.state_dir))
    atomic_write_text(node_env, json.dumps(info.s3.env()), mode=0o600)
    return info.env()


def _stop_services(cluster: Cluster) -> None:
    """Stops the services `up --services` started, if any, and deletes their data."""
    if _services_state(cluster).exists():
        remove_all(*load_state(_services_state(cluster)))
        _services_state(cluster).unlink()
    raynodes.services_env_file(Path(cluster.state_dir)).unlink(missing_ok=True)


def _write_env_file(cluster: Cluster, services: dict[str, str]) -> None:
    shim = cluster.python_shim
    shim.parent.mkdir(exist_ok=True)
    atomic_write_text(
        shim,
        "#!/bin/sh\n# The venv's python on the head node: a Ray driver runs on a node of its cluster.\n"
        f'exec ip netns exec {cluster.head.netns} {shlex.quote(sys.executable)} "$@"\n',
    )
    shim.chmod(0o755)
    path = f"{shim.parent}:{Path(sys.executable).parent}"
    lines = [
        "# Written by `python -m cli.localcluster up` (make cluster-up), deleted by `down`.",
        f"export RAY_ADDRESS={cluster.gcs_address}",
        f"export RAY_API_SERVER_ADDRESS={cluster.dashboard_url}",
        "export RAY_AUTH_MODE=token",
        f"export RAY_AUTH_TOKEN_PATH={shlex.quote(cluster.token_file)}",
        "# `python` runs on the head node; a service the nodes must reach (an MLflow server)",
        f"# listens on {cluster.bridge_ip}, this machine's address on the cluster's network.",
        f'export PATH={shlex.quote(path)}:"$PATH"',
    ]
    if services:
        lines.append("# The services `up --services` started on that address (secrets: this file is 0600).")
    text = "\n".join(lines) + "\n" + export_lines(services)
    atomic_write_text(cluster.env_file, text, mode=0o600 if services else 0o666)


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    """Serialises choosing a subnet and creating its bridge (which routes it) across `up`s."""
    with open(Path(tempfile.gettempdir()) / "localcluster-subnet.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def up(
    state_dir: Path = STATE_DIR,
    env_file: Path = ENV_FILE,
    workers: int = 1,
    cpus_per_node: int = 2,
    object_store_mb: int = 1024,
    subnet: IPv4Network | None = None,
    services: bool = False,
) -> Cluster:
    """Starts a head and `workers` worker nodes, each in its own network namespace, waits until
    the head lists them all ALIVE, and writes `env_file`; with `services`, the shared services
    on the bridge address first (module docstring). On any failure it takes down what it
    started, then raises.

    Raises:
        ValueError: On a bad argument (named), before anything starts.
        RuntimeError: When a cluster is already recorded in `state_dir`, or a step fails.
    """
    if workers < 1 or cpus_per_node < 1 or object_store_mb < 100:
        raise ValueError(
            f"workers={workers}, cpus_per_node={cpus_per_node}, object_store_mb={object_store_mb}: "
            "expected workers >= 1, cpus_per_node >= 1, object_store_mb >= 100"
        )
    netns.require_root()
    state_dir = Path(state_dir).resolve()
    if raynodes.state_file(state_dir).exists():
        raise RuntimeError(f"a cluster is recorded in {raynodes.state_file(state_dir)}: `down` it first")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cluster_id = hashlib.sha1(str(state_dir).encode()).hexdigest()[:6]
    try:
        with _subnet_lock():
            net = netns.pick_subnet(subnet)
            cluster = raynodes.save(
                Cluster(
                    state_dir=str(state_dir),
                    cluster_id=cluster_id,
                    subnet=str(net),
                    bridge=f"lc{cluster_id}",
                    token_file=str(state_dir / "auth_token"),
                    env_file=str(Path(env_file).resolve()),
                    cpus_per_node=cpus_per_node,
                    object_store_mb=object_store_mb,
                )
            )
            netns.create_bridge(cluster.bridge, IPv4Interface(f"{cluster.bridge_ip}/{net.prefixlen}"))
        exports = _start_services(cluster) if services else {}
        fd = os.open(cluster.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, Ray's own token format
        cluster = raynodes.start_node(cluster, "head")
        raynodes.wait_for_states(cluster, {cluster.head.ip: "ALIVE"})
        for i in range(1, workers + 1):
            cluster = raynodes.start_node(cluster, f"w{i}")
        raynodes.wait_for_states(cluster, {n.ip: "ALIVE" for n in cluster.nodes})
        _write_env_file(cluster, exports)
    except BaseException:
        down(state_dir)
        raise
    return cluster


def add_worker(cluster: Cluster) -> Cluster:
    """Starts one more worker node (a new namespace and address) and waits until it is ALIVE;
    returns the cluster with it."""
    cluster = raynodes.load(Path(cluster.state_dir))
    if cluster is None:
        raise RuntimeError("the cluster is down")
    index = 1 + max((int(n.name[1:]) for n in cluster.nodes[1:]), default=0)
    cluster = raynodes.start_node(cluster, f"w{index}")
    raynodes.wait_for_states(cluster, {cluster.nodes[-1].ip: "ALIVE"})
    return cluster


def kill_node(cluster: Cluster, name: str) -> list[int]:
    """SIGKILLs every process inside node `name`'s namespace (its raylet, workers and all), as
    if its machine died; its namespace stays until `down`. Returns the pids it killed."""
    node = next((n for n in cluster.nodes if n.name == name), None)
    if node is None:
        raise ValueError(f"no node {name!r}; nodes: {[n.name for n in cluster.nodes]}")
    return netns.kill_netns(node.netns)


def down(state_dir: Path = STATE_DIR) -> bool:
    """Stops and removes everything the cluster recorded in `state_dir`; returns False (and
    does nothing) when none is recorded."""
    cluster = raynodes.load(Path(state_dir))
    if cluster is None:
        return False
    # Workers first: a worker's raylet shuts down faster while its GCS still answers. Then
    # whatever still runs in a node's namespace (a process that left `ray start`'s group).
    for group in (cluster.nodes[1:], cluster.nodes[:1]):
        stop_processes([n.record() for n in group if n.pid], STOP_GRACE_S)
        for node in group:
            netns.kill_netns(node.netns)
    for node in cluster.nodes:
        netns.delete_link(node.veth)
        netns.delete_netns(node.netns)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        Path(node.log).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(node.temp_dir).parent.rmdir()
    _stop_services(cluster)
    netns.delete_link(cluster.bridge)
    for path in (cluster.env_file, cluster.python_shim, cluster.token_file):
        Path(path).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        cluster.python_shim.parent.rmdir()
    raynodes.state_file(Path(state_dir)).unlink()
    with contextlib.suppress(OSError):
        Path(state_dir).rmdir()
    return True


@contextlib.contextmanager
def running(
    state_dir: Path, env_file: Path, workers: int = 1, cpus_per_node: int = 2, services: bool = False
) -> Iterator[Cluster]:
    """`up` for the block, `down` after it, even when it fails."""
    cluster = up(state_dir, env_file, workers=workers, cpus_per_node=cpus_per_node, services=services)
    try:
        yield cluster
    finally:
        down(state_dir)


def main(argv: list[str] | None = None) -> int:
    """`up` or `down` from the command line; prints what it did and how long it took."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR, help="where the state is kept")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start the head and worker nodes, write cluster.env")
    start.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (>= 1)")
    start.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs each node offers")
    start.add_argument("--object-store-mb", type=int, default=1024, help="object store per node")
    start.add_argument("--subnet", type=IPv4Network, help="private network (default: a free 10.203.N.0/24)")
    start.add_argument("--env-file", type=Path, default=ENV_FILE, help="where to write the exports")
    start.add_argument("--services", action="store_true", help="also S3, PostgreSQL and mlflow server")
    commands.add_parser("down", help="stop and remove everything `up` started")
    args = parser.parse_args(argv)
    began = time.monotonic()
    if args.command == "down":
        print("stopped" if down(args.state_dir) else "nothing to stop", end="")
        print(f" in {time.monotonic() - began:.1f} s")
        return 0
    try:
        sizes = (args.workers, args.cpus_per_node, args.object_store_mb)
        cluster = up(args.state_dir, args.env_file, *sizes, args.subnet, args.services)
    except (ValueError, RuntimeError, TimeoutError, ServiceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for node in cluster.nodes:
        print(f"{node.name:>5}  {node.ip}  namespace {node.netns}  {cluster.cpus_per_node} CPUs")
    print(f"up in {time.monotonic() - began:.1f} s; dashboard {cluster.dashboard_url}")
    if args.services:
        print(f"services on {cluster.bridge_ip}: S3, PostgreSQL, mlflow server (see {cluster.env_file})")
    print(f"next: source {cluster.env_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
