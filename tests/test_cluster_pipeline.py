"""The pipeline on a real multi-node Ray cluster (a head and a worker node, each a `ray start`
in its own network namespace: `make cluster-up`'s code), both ways users run it, and with a
worker node killed in the middle of the shard stage and of training.

The tests share the module's cluster and run in file order. The first one's DVC workspace
is the others' input: its sample is their raw data, its shards the undisturbed reference.
A test that kills the worker node first makes sure one is alive (`worker_node`); the
training test adds the replacement node the shard test then kills.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import psutil
import pytest
import requests
import yaml

from cli import netns
from cli.localcluster import add_worker, kill_node
from cli.raynodes import Cluster, Node, load, node_states
from pipeline.data.shards import ShardMeta
from tests.conftest import ROOT, git_project, in_sourced_shell, sourced, stage_env, write_params
from tests.test_training import epoch_steps, history, registered, wait_for

# The tiny profile with two training workers spread over the nodes (halves of a core, so
# that after a node is lost both fit on the head with a CPU left for Ray Data) and 8 shard
# tasks (6 train, 2 val) for the scheduler to spread.
PROFILE = {
    "shard": {"shard_size": 8},
    "train": {"num_workers": 2, "cpus_per_worker": 0.5, "placement": "spread", "max_failures": 2},
}
STAGES = ("sample", "shard", "stats", "train", "evaluate")


def _dashboard(cluster: Cluster, path: str, params: dict | None = None) -> list[dict]:
    token = Path(cluster.token_file).read_text().strip()
    reply = requests.get(
        f"{cluster.dashboard_url}/api/v0/{path}",
        params={"limit": 10000, "detail": 1, **(params or {})},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    reply.raise_for_status()
    return reply.json()["data"]["result"]["result"]


def node_ips(cluster: Cluster) -> dict[str, str]:
    """Ray node id -> the node's IP, for every node the head has known (dead ones too)."""
    return {n["node_id"]: n["node_ip"] for n in _dashboard(cluster, "nodes")}


def worker_node(cluster: Cluster) -> tuple[Cluster, Node]:
    """The cluster as recorded now and an ALIVE worker node of it (one joins if none is)."""
    cluster = load(Path(cluster.state_dir))
    assert cluster is not None
    states = node_states(cluster)
    alive = [n for n in cluster.nodes[1:] if states.get(n.ip) == "ALIVE"]
    if not alive:
        cluster = add_worker(cluster)
        alive = [cluster.nodes[-1]]
    return cluster, alive[-1]


def assert_spread(ws: Path, data: dict[str, str], cluster: Cluster) -> None:
    """The stage metrics and the MLflow run of `ws` record shard tasks and training workers
    on more than one node of `cluster`, every shard task and every worker accounted for."""
    ips = node_ips(cluster)
    shard = json.loads((ws / data["shard_metrics"]).read_text())
    meta = ShardMeta.read(str(ws / data["shards"]))
    per_node = shard["shards_per_node"]
    assert sum(per_node.values()) == sum(len(meta.files(s, "parquet")) for s in ("train", "val")) == 8
    assert len(per_node) == 2 and {ips[n] for n in per_node} == {n.ip for n in cluster.nodes}, per_node

    train = json.loads((ws / data["train_metrics"]).read_text())
    [workers] = train["worker_nodes"]  # one attempt: nothing failed
    assert len(set(workers)) == 2 and {ips[n] for n in workers} == {n.ip for n in cluster.nodes}

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    run = mlflow.get_run(train["mlflow_run_id"])
    assert run.data.tags["worker_nodes"] == ",".join(workers)
    assert run.data.tags["shard_nodes"] == ",".join(sorted(per_node))
    recorded = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/worker_nodes.json")
    assert recorded == {"worker_nodes": [workers]}
    assert run.data.metrics["eval_top1_error_10crop"] >= 0.0
    assert json.loads((ws / data["eval_metrics"]).read_text())["num_images"] == meta.counts["val"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean clone of the project with the tiny cluster profile."""
    return git_project(tmp_path_factory.mktemp("cluster_project"), PROFILE)


def test_dvc_repro_runs_shard_tasks_and_workers_on_both_nodes(
    namespace_cluster: Cluster, project: Path
) -> None:
    out = in_sourced_shell(namespace_cluster, "dvc repro", cwd=project)
    assert set(re.findall(r"Running stage '(\w+)'", out)) == set(STAGES)
    data = yaml.safe_load((project / "params.yaml").read_text())["data"]
    assert_spread(project, data, namespace_cluster)
    assert epoch_steps(project) == [1, 2]


def test_submitted_job_runs_shard_tasks_and_workers_on_both_nodes(
    namespace_cluster: Cluster, tmp_path: Path
) -> None:
    # As the README says: from a folder every node sees, with relative paths and the default
    # SQLite store there (--shared-cwd), while the job runs in its own copy of the code.
    params = write_params(tmp_path, PROFILE)
    env = stage_env() | {"PYTHONPATH": str(ROOT)}
    submit = "python -m cli.submit --no-pip --shared-cwd --params params.yaml " + " ".join(STAGES)
    assert "SUCCEEDED" in in_sourced_shell(namespace_cluster, submit, env=env, cwd=tmp_path)
    assert_spread(tmp_path, yaml.safe_load(params.read_text())["data"], namespace_cluster)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = mlflow.search_runs(experiment_names=["alexnet"], output_format="list")
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri()), "artifacts beside the store"


def test_training_survives_a_killed_worker_node(
    namespace_cluster: Cluster, project: Path, tmp_path: Path
) -> None:
    cluster, worker = worker_node(namespace_cluster)
    killed_id = next(i for i, ip in node_ips(cluster).items() if ip == worker.ip)
    (tmp_path / "data").mkdir()
    shutil.copytree(project / "data/shards", tmp_path / "data/shards")
    shutil.copy2(project / "data/stats.json", tmp_path / "data/stats.json")
    epochs = 4
    write_params(tmp_path, {**PROFILE, "train": {**PROFILE["train"], "epochs": epochs}})
    proc = subprocess.Popen(
        sourced(cluster, "python -m stages.train"), cwd=tmp_path, env=stage_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: registered(tmp_path) >= 1, proc, "a registered checkpoint", timeout=600)
    kill_node(cluster, worker.name)
    assert proc.poll() is None and registered(tmp_path) < epochs, "killed too late: training had ended"
    replacement = add_worker(cluster).nodes[-1]
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]  # the driver on the head carried on

    summary = json.loads((tmp_path / "metrics/train.json").read_text())
    first, *later = summary["worker_nodes"]
    assert killed_id in first and len(set(first)) == 2, "the first attempt ran on both nodes"
    assert later and all(killed_id not in nodes for nodes in later)
    ips = node_ips(cluster)
    assert {ips[n] for nodes in later for n in nodes} <= {cluster.head.ip, replacement.ip}
    # Every epoch once: in the history, in MLflow, and in the final metrics.
    rows = history(tmp_path)
    assert [int(float(r["epoch"])) for r in rows] == list(range(1, epochs + 1))
    assert rows[0]["restarts"] == "0" and rows[-1]["restarts"] != "0"
    assert summary["epochs_run"] == epochs
    assert epoch_steps(tmp_path) == list(range(1, epochs + 1))
    meta = ShardMeta.read(str(tmp_path / "data/shards"))
    assert all(int(float(r["train_images"])) == meta.counts["train"] for r in rows)


def running_task(node: Node, name: str) -> bool:
    """Whether a Ray worker inside `node`'s namespace is executing task `name` now (Ray sets
    a worker's process title to ray::<task> while it runs one)."""
    for pid in netns.netns_pids(node.netns):
        try:
            if psutil.Process(pid).cmdline()[:1] == [f"ray::{name}"]:
                return True
        except psutil.NoSuchProcess:
            pass
    return False


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shard_stage_survives_a_killed_worker_node(
    namespace_cluster: Cluster, project: Path, tmp_path: Path
) -> None:
    cluster, worker = worker_node(namespace_cluster)
    killed_id = next(i for i, ip in node_ips(cluster).items() if ip == worker.ip)
    write_params(tmp_path, {**PROFILE, "data": {"raw": str(project / "data/sample")}})
    proc = subprocess.Popen(
        sourced(cluster, "python -m stages.shard"), cwd=tmp_path, env=stage_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: running_task(worker, "_write_shard"), proc, "a shard task on the worker", timeout=600)
    kill_node(cluster, worker.name)
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]

    assert files(tmp_path / "data/shards") == files(project / "data/shards")  # byte for byte
    metrics = json.loads((tmp_path / "metrics/shard.json").read_text())
    assert metrics["inputs"] == metrics["sharded"] == {"train": 48, "val": 12}
    assert sum(metrics["shards_per_node"].values()) == 8
    # The task the node was running was lost and ran again elsewhere.
    retried = _dashboard(cluster, "tasks", {"filter_keys": "name", "filter_predicates": "=",
                                            "filter_values": "_write_shard"})  # fmt: skip
    again = [t for t in retried if t["attempt_number"] > 0 and t["state"] == "FINISHED"]
    assert again and all(t["node_id"] != killed_id for t in again), retried
