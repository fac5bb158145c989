"""The local cluster's Ray nodes: what is recorded about them, starting one inside its network
namespace, and their state as the head reports it (see cli.localcluster for the design)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import requests

from cli import netns
from cli.procs import ProcessRecord, is_running, log_tail, spawn
from pipeline.cluster import worker_pool_env
from pipeline.storage import atomic_write_text

GCS_PORT = 6379  # Ray's defaults: every node has its own namespace, so nothing else holds them
DASHBOARD_PORT = 8265
START_TIMEOUT_S = 180  # a node's `ray start` until the GCS lists it ALIVE, on 2 busy cores


@dataclass(frozen=True)
class Node:
    """One Ray node: its namespace, address, temp dir, log, and the `ray start` process."""

    name: str
    netns: str
    veth: str  # host end of the veth pair
    ip: str
    temp_dir: str
    log: str
    pid: int = 0  # 0 until `ray start` runs
    pid_start: float = 0.0  # its start time, so a reused pid is never signalled

    def record(self) -> ProcessRecord:
        """Its `ray start` process, as `cli.procs` stops it."""
        return ProcessRecord(self.name, self.pid, self.pid_start, signal.SIGTERM, Path(self.log))


@dataclass(frozen=True)
class Cluster:
    """Everything `up` created, as recorded in <state_dir>/state.json; nodes[0] is the head."""

    state_dir: str
    cluster_id: str
    subnet: str
    bridge: str
    token_file: str
    env_file: str
    cpus_per_node: int
    object_store_mb: int
    nodes: tuple[Node, ...] = ()

    @property
    def head(self) -> Node:
        """The head node."""
        return self.nodes[0]

    @property
    def bridge_ip(self) -> str:
        """The host's address on the cluster's network."""
        return str(IPv4Network(self.subnet)[1])

    @property
    def gcs_address(self) -> str:
        """What drivers join (RAY_ADDRESS)."""
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        """Where job clients submit (RAY_API_SERVER_ADDRESS)."""
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def python_shim(self) -> Path:
        """The `python` that cluster.env puts first on PATH: the venv's, on the head node."""
        return Path(self.state_dir) / "bin" / "python"


def services_env_file(state_dir: Path) -> Path:
    """Where `up --services` keeps the S3 settings every node's Ray processes get (0600)."""
    return state_dir / "node-env.json"


def state_file(state_dir: Path) -> Path:
    """Where the cluster recorded in `state_dir` keeps its state."""
    return Path(state_dir) / "state.json"


def load(state_dir: Path) -> Cluster | None:
    """The cluster recorded in `state_dir`, or None."""
    path = state_file(state_dir)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Cluster(**{**data, "nodes": tuple(Node(**n) for n in data["nodes"])})


def save(cluster: Cluster) -> Cluster:
    """Records `cluster` in its state dir (atomically) and returns it."""
    atomic_write_text(state_file(Path(cluster.state_dir)), json.dumps(asdict(cluster), indent=1))
    return cluster


def with_node(cluster: Cluster, node: Node) -> Cluster:
    """`cluster` with `node` added or updated (by name), saved."""
    others = tuple(n for n in cluster.nodes if n.name != node.name)
    if len(others) == len(cluster.nodes):
        return save(replace(cluster, nodes=(*cluster.nodes, node)))
    return save(replace(cluster, nodes=tuple(node if n.name == node.name else n for n in cluster.nodes)))


def ray_env(cluster: Cluster) -> dict[str, str]:
    """The environment of the cluster's Ray processes: the caller's, with the cluster's token;
    this venv first on PATH (as a node's image has its python: a job's `python -m ...`);
    RAY_ADDRESS, since code in workers that looks for "the" cluster (Ray Train's placement
    group cleaner, through the state API) would find every Ray instance on this machine; and
    gloo on each namespace's eth0: the machine's hostname resolves to 127.0.0.1, so gloo would
    otherwise give its peers on other nodes a loopback address to connect to; and the worker
    pool's size (`pipeline.cluster.worker_pool_env`)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    services = services_env_file(Path(cluster.state_dir))
    if services.exists():  # the S3 settings of the services `up` started beside the nodes
        env |= json.loads(services.read_text())
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env | {
        "PATH": path,
        "RAY_ADDRESS": cluster.gcs_address,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": cluster.token_file,
        "GLOO_SOCKET_IFNAME": "eth0",
        **worker_pool_env(cluster.cpus_per_node),
    }


def ray_start_args(cluster: Cluster, node: Node) -> list[str]:
    args = [
        "--block",
        f"--node-ip-address={node.ip}",
        f"--num-cpus={cluster.cpus_per_node}",
        f"--object-store-memory={cluster.object_store_mb * 2**20}",
        f"--temp-dir={node.temp_dir}",
        "--disable-usage-stats",
    ]
    if node.name == "head":
        return [
            *args,
            "--head",
            f"--port={GCS_PORT}",
            "--include-dashboard=true",
            f"--dashboard-host={node.ip}",
            f"--dashboard-port={DASHBOARD_PORT}",
        ]
    return [*args, f"--address={cluster.gcs_address}"]


def start_node(cluster: Cluster, name: str) -> Cluster:
    """Creates node `name`'s namespace and starts its `ray start`, recording each step first."""
    index = 0 if name == "head" else int(name[1:])
    net = IPv4Network(cluster.subnet)
    if index + 2 >= net.num_addresses - 1:
        raise ValueError(f"subnet {cluster.subnet} has no address left for node {name}")
    tmp_root = Path(tempfile.gettempdir()) / f"ray-lc{cluster.cluster_id}"  # short: Ray's socket
    node = Node(  # paths must fit in 107 characters
        name=name,
        netns=f"lc{cluster.cluster_id}-{name}",
        veth=f"lc{cluster.cluster_id}-{name}",
        ip=str(net[index + 2]),
        temp_dir=str(tmp_root / name),
        log=str(Path(cluster.state_dir) / f"{name}.log"),
    )
    cluster = with_node(cluster, node)
    netns.create_netns(node.netns, node.veth, cluster.bridge, IPv4Interface(f"{node.ip}/{net.prefixlen}"))
    Path(node.temp_dir).mkdir(parents=True, mode=0o700)
    return _ray_start(cluster, node)


def restart_node(cluster: Cluster, name: str) -> Cluster:
    """Starts node `name`'s `ray start` again in its namespace, after its processes died
    (`cli.localcluster.kill_node`): same address, ports, temp dir and token.

    Raises:
        ValueError: No such node, or its `ray start` still runs.
    """
    node = next((n for n in cluster.nodes if n.name == name), None)
    if node is None or is_running(node.record()):
        names = [n.name for n in cluster.nodes]
        raise ValueError(f"node {name!r} is not a stopped node of the cluster (nodes: {names})")
    from ray._private.utils import get_ray_address_file

    # The dead session's address: `ray start --head` refuses to start while it names an address
    # that some GCS process on this machine (another namespace's cluster, too) has on its
    # command line.
    Path(get_ray_address_file(node.temp_dir)).unlink(missing_ok=True)
    return _ray_start(cluster, node)


def _ray_start(cluster: Cluster, node: Node) -> Cluster:
    """Spawns `ray start` for `node` inside its namespace and records its process."""
    ray = Path(sys.executable).parent / "ray"
    argv = ["ip", "netns", "exec", node.netns, str(ray), "start", *ray_start_args(cluster, node)]
    # Its own session: it outlives `up` and the terminal's Ctrl-C.
    _, record = spawn(node.name, argv, Path(node.log), ray_env(cluster), cwd=Path(node.temp_dir))
    return with_node(cluster, replace(node, pid=record.pid, pid_start=record.create_time))


def node_states(cluster: Cluster) -> dict[str, str]:
    """Node state (ALIVE or DEAD) by node IP, as the head's GCS reports it through the
    dashboard (ALIVE wins when a dead and a live node share an IP).

    Raises:
        requests.RequestException: When the dashboard does not answer, or refuses the token.
    """
    token = Path(cluster.token_file).read_text().strip()
    reply = requests.get(
        f"{cluster.dashboard_url}/api/v0/nodes",
        params={"limit": 10000},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    reply.raise_for_status()
    states: dict[str, str] = {}
    for node in reply.json()["data"]["result"]["result"]:
        if states.get(node["node_ip"]) != "ALIVE":
            states[node["node_ip"]] = node["state"]
    return states


def wait_for_states(cluster: Cluster, wanted: dict[str, str], timeout_s: float = START_TIMEOUT_S) -> None:
    """Polls until every IP in `wanted` has its wanted state (ALIVE or DEAD).

    Raises:
        RuntimeError: When a node expected ALIVE has no running `ray start` (its log's tail).
        TimeoutError: When `timeout_s` seconds pass first.
    """
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while True:
        try:
            states = node_states(cluster)
        except (requests.ConnectionError, requests.Timeout):
            pass  # the dashboard is still starting
        except requests.HTTPError as e:
            if e.response.status_code < 500:
                raise
        if all(states.get(ip) == state for ip, state in wanted.items()):
            return
        for node in cluster.nodes:
            if wanted.get(node.ip) == "ALIVE" and not is_running(node.record()):
                raise RuntimeError(
                    f"node {node.name}: `ray start` exited; {node.log}:\n{log_tail(Path(node.log))}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout_s:.0f} s the head reports {states}, expected {wanted}")
        time.sleep(0.25)
