"""The local multi-node cluster (`make cluster-up`) for real: a head and a worker node, each a
`ray start` in its own network namespace, joined by a driver started the way `dvc repro` starts
a stage, by the job client from the host, and by a replacement after a node is killed.

The tests share one cluster and run in file order; the last one takes it down.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from cli import netns
from cli.localcluster import add_worker, down, kill_node, up
from cli.raynodes import Cluster, load, node_states, wait_for_states
from pipeline.config import load_params
from tests.conftest import ROOT, in_sourced_shell, stage_env, write_params

# A driver as a stage is one: init_ray() with what cluster.env exported. One 1-CPU task per
# node (a STRICT_SPREAD placement group), each given an object by reference, which the worker
# resolves by calling the driver back, and asking the state API (as Ray Train's placement
# group cleaner does) how many nodes "the" cluster has.
DRIVER = """
import json, ray, numpy as np
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from pipeline.cluster import init_ray

init_ray()
alive = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
pg = placement_group([{"CPU": 1}] * len(alive), strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=120)

@ray.remote(num_cpus=1)
def where(refs):
    from ray.util.state import list_nodes

    seen = sum(n.state == "ALIVE" for n in list_nodes())
    return ray.get_runtime_context().get_node_id(), float(ray.get(refs[0]).sum()), seen

ones = ray.put(np.ones(100_000))
tasks = [
    where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote([ones])
    for i in range(len(alive))
]
driver = ray.get_runtime_context().get_node_id()
print(json.dumps({"alive": alive, "driver": alive[driver], "tasks": ray.get(tasks, timeout=120)}))
"""

# DDP's collective across the two nodes: two ranks in a STRICT_SPREAD placement group meet at
# rank 0's node address over gloo, as Ray Train's workers do.
GLOO = """
import json, ray, torch, torch.distributed as dist
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from pipeline.cluster import init_ray

init_ray()
pg = placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=120)

@ray.remote(num_cpus=1)
class Rank:
    def ip(self):
        return ray.util.get_node_ip_address()

    def all_reduce(self, master, rank):
        dist.init_process_group("gloo", init_method=f"tcp://{master}:29500", rank=rank, world_size=2)
        total = torch.full((1,), rank + 1.0)
        dist.all_reduce(total)
        dist.destroy_process_group()
        return total.item()

ranks = [Rank.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote() for i in range(2)]
ips = ray.get([r.ip.remote() for r in ranks])
sums = ray.get([r.all_reduce.remote(ips[0], i) for i, r in enumerate(ranks)], timeout=120)
print(json.dumps({"ips": ips, "sums": sums}))
"""


def running(pid: int, started: float) -> bool:
    """Whether that process runs: not gone, not a zombie, not a later one with its pid."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < 0.01
    except psutil.NoSuchProcess:
        return False


def run_driver(cluster: Cluster, script: str = DRIVER) -> dict:
    """Runs `script` with cluster.env's `python`; returns the JSON it printed last."""
    return json.loads(in_sourced_shell(cluster, f"python -c {shlex.quote(script)}").splitlines()[-1])


def test_cluster_profile_is_the_sample_profile_with_two_workers() -> None:
    sample, cluster = (yaml.safe_load((ROOT / f).read_text()) for f in ("params.yaml", "params-cluster.yaml"))
    assert cluster["train"].pop("num_workers") == 2 and sample["train"].pop("num_workers") == 1
    assert cluster == sample
    assert load_params(ROOT / "params-cluster.yaml").train.num_workers == 2


def test_driver_started_like_a_stage_runs_on_every_node(namespace_cluster: Cluster) -> None:
    cluster = namespace_cluster
    report = run_driver(cluster)
    ips = sorted(report["alive"].values())
    assert ips == sorted(n.ip for n in cluster.nodes)  # the namespaces' own addresses
    assert len(set(ips)) == len(ips) == 2
    assert all(IPv4Address(ip) in IPv4Network(cluster.subnet) for ip in ips)
    assert report["driver"] == cluster.head.ip
    assert {node for node, _, _ in report["tasks"]} == set(report["alive"])  # one task on each node
    assert [total for _, total, _ in report["tasks"]] == [100_000.0, 100_000.0]
    assert [seen for _, _, seen in report["tasks"]] == [2, 2]


def test_gloo_all_reduce_crosses_node_addresses(namespace_cluster: Cluster) -> None:
    report = run_driver(namespace_cluster, GLOO)
    assert sorted(report["ips"]) == sorted(n.ip for n in namespace_cluster.nodes)
    assert report["sums"] == [3.0, 3.0]


def test_driver_outside_the_head_namespace_is_refused(namespace_cluster: Cluster) -> None:
    # The venv's python itself, in the host's namespace: Ray would attach it to the head's
    # raylet, where workers could never call it back.
    command = f"{shlex.quote(sys.executable)} -c 'from pipeline.cluster import init_ray; init_ray()'"
    script = f"source {shlex.quote(namespace_cluster.env_file)} && {command}"
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=stage_env(), capture_output=True, text=True)
    assert out.returncode != 0
    assert f"Ray attached this driver to the node at {namespace_cluster.head.ip}" in out.stderr


def test_dashboard_takes_jobs_only_with_the_token(namespace_cluster: Cluster, tmp_path: Path) -> None:
    jobs = f"{namespace_cluster.dashboard_url}/api/jobs/"
    assert requests.post(jobs, json={"entrypoint": "true"}, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert requests.post(jobs, json={"entrypoint": "true"}, headers=wrong, timeout=30).status_code == 403

    params = write_params(tmp_path)
    submit = f"{shlex.quote(sys.executable)} -m cli.submit --no-pip --params {params} sample"
    no_token = f"unset RAY_AUTH_TOKEN_PATH && {submit}"  # and a HOME without ~/.ray/auth_token
    script = f"source {shlex.quote(namespace_cluster.env_file)} && unset RAY_AUTH_MODE && {no_token}"
    env = stage_env() | {"HOME": str(tmp_path)}
    refused = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr

    # From the host's namespace, as the README says: the client needs no node.
    assert "SUCCEEDED" in in_sourced_shell(namespace_cluster, submit)


def test_up_refuses_a_second_cluster_and_an_overlapping_subnet(namespace_cluster: Cluster) -> None:
    with pytest.raises(RuntimeError, match="a cluster is recorded in"):
        up(Path(namespace_cluster.state_dir), Path(namespace_cluster.env_file))
    ours = IPv4Network(namespace_cluster.subnet)
    assert not netns.pick_subnet().overlaps(ours)
    with pytest.raises(ValueError, match=f"overlaps {ours}"):
        netns.pick_subnet(ours)


def test_killed_worker_node_is_dead_and_a_replacement_takes_work(namespace_cluster: Cluster) -> None:
    worker = namespace_cluster.nodes[1]
    killed = kill_node(namespace_cluster, worker.name)
    assert worker.pid in killed and netns.netns_pids(worker.netns) == []
    wait_for_states(namespace_cluster, {worker.ip: "DEAD"}, timeout_s=120)

    cluster = add_worker(namespace_cluster)
    replacement = cluster.nodes[-1]
    assert replacement.ip not in (n.ip for n in namespace_cluster.nodes)
    assert node_states(cluster) == {cluster.head.ip: "ALIVE", worker.ip: "DEAD", replacement.ip: "ALIVE"}
    report = run_driver(cluster)
    assert sorted(report["alive"].values()) == sorted([cluster.head.ip, replacement.ip])
    assert {node for node, _, _ in report["tasks"]} == set(report["alive"])


def test_down_leaves_no_namespace_link_process_or_file(namespace_cluster: Cluster) -> None:
    cluster = load(Path(namespace_cluster.state_dir))  # with a replacement node, if one joined
    assert cluster is not None
    assert down(Path(cluster.state_dir))

    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    namespaces = {line.split()[0] for line in listed.splitlines() if line.strip()}
    linked = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout
    links = {link["ifname"] for link in json.loads(linked)}
    for node in cluster.nodes:
        assert node.netns not in namespaces and node.veth not in links
        assert not Path(node.temp_dir).exists()
        assert not running(node.pid, node.pid_start)
    assert cluster.bridge not in links
    for path in (cluster.env_file, cluster.token_file, cluster.python_shim, cluster.state_dir):
        assert not Path(path).exists()
    assert not down(Path(cluster.state_dir))  # nothing left to stop
