"""The pipeline on a real multi-node Ray cluster with the shared services teams run
(`make cluster-up --services`: a head and a worker node, each a `ray start` in its own
network namespace, and moto's S3 server, PostgreSQL and an `mlflow server` with S3
artifacts on the cluster's bridge), both ways users run it, and with a worker node killed
in the middle of the shard stage and of training.

Everything lives where teams keep it: the raw images uploaded to S3 (`data.raw`), the
shards (`data.shard_store`) and Ray Train's checkpoints (`data.checkpoints`) on S3, the
runs, metrics and models in the tracking server, the models' files in its S3 artifact
store. `dvc repro` (with RAY_ADDRESS set) and a `cli.submit` job each run the pipeline
once; the server then holds both runs, and `models:/alexnet@champion` loads from the
artifact store and predicts what the exported model does.

The tests share the module's cluster and run in file order. The first pipeline's DVC
workspace is the others' input: its raw upload theirs, its shard manifest the undisturbed
reference. A test that kills the worker node first makes sure one is alive
(`worker_node`); the training test adds the replacement node the shard test then kills.
The last test stops the cluster's services with `down`.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pyarrow.fs as pafs
import pytest
import requests
import torch
import yaml
from mlflow import MlflowClient

from cli import netns
from cli.localcluster import add_worker, down, kill_node
from cli.procs import port_open
from cli.raynodes import Cluster, Node, load, node_states
from pipeline.data.shards import ShardMeta
from pipeline.train.model_card import load_model
from tests.conftest import ROOT, exported, git_project, in_sourced_shell, sourced, stage_env, write_params
from tests.test_training import history, registered, wait_for

# The tiny profile with two training workers spread over the nodes (halves of a core, so
# that after a node is lost both fit on the head with a CPU left for Ray Data) and 8 shard
# tasks (6 train, 2 val) for the scheduler to spread.
PROFILE = {
    "shard": {"shard_size": 8},
    "train": {"num_workers": 2, "cpus_per_worker": 0.5, "placement": "spread", "max_failures": 2},
}
STAGES = ("sample", "shard", "stats", "train", "evaluate")
RAW = "s3://alexnet/raw"  # the project's sample, uploaded
SHARD_STORE = "s3://alexnet/shards"


def on_s3(checkpoints: str) -> dict[str, dict]:
    """PROFILE with the raw images, the shards and the checkpoints (under `checkpoints`) on S3."""
    data = {"raw": RAW, "shard_store": SHARD_STORE, "checkpoints": f"s3://alexnet/{checkpoints}"}
    return {**PROFILE, "data": data}


def s3(cluster: Cluster) -> pafs.S3FileSystem:
    """A client of the cluster's S3 server with the settings cluster.env gives users."""
    env = exported(cluster)
    return pafs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_DEFAULT_REGION"],
    )


def tracking(cluster: Cluster) -> MlflowClient:
    """A client of the cluster's tracking server; also points `mlflow` at it."""
    uri = exported(cluster)["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def run_id(ws: Path) -> str:
    return json.loads((ws / "metrics/train.json").read_text())["mlflow_run_id"]


def logged_epochs(cluster: Cluster, ws: Path) -> list[int]:
    """The epochs the tracking server holds for the run of the training in `ws`."""
    return sorted(m.step for m in tracking(cluster).get_metric_history(run_id(ws), "val_top1_error"))


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

    run = tracking(cluster).get_run(train["mlflow_run_id"])
    assert run.data.tags["worker_nodes"] == ",".join(workers)
    assert run.data.tags["shard_nodes"] == ",".join(sorted(per_node))
    recorded = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/worker_nodes.json")  # from S3
    assert recorded == {"worker_nodes": [workers]}
    assert run.data.metrics["eval_top1_error_10crop"] >= 0.0
    assert json.loads((ws / data["eval_metrics"]).read_text())["num_images"] == meta.counts["val"]


@pytest.fixture(scope="module")
def cluster(services_cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, and this process a client of its services as a user's Python
    with cluster.env sourced is (the tracking server, S3)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in exported(services_cluster).items():
            if key.startswith(("MLFLOW_", "AWS_")):
                patch.setenv(key, value)
        yield services_cluster


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean clone of the project with the tiny cluster profile, everything on S3."""
    return git_project(tmp_path_factory.mktemp("cluster_project"), on_s3("dvc/checkpoints"))


def test_cluster_env_names_the_services_on_the_bridge_and_is_private(cluster: Cluster) -> None:
    env = exported(cluster)
    assert env["MLFLOW_TRACKING_URI"].startswith(f"http://{cluster.bridge_ip}:")
    assert env["AWS_ENDPOINT_URL"].startswith(f"http://{cluster.bridge_ip}:")
    assert env["AWS_SECRET_ACCESS_KEY"]
    assert stat.S_IMODE(Path(cluster.env_file).stat().st_mode) == 0o600


def test_dvc_repro_on_s3_runs_shard_tasks_and_workers_on_both_nodes(cluster: Cluster, project: Path) -> None:
    in_sourced_shell(cluster, "dvc repro sample", cwd=project)
    upload = f"import pyarrow.fs as fs; fs.copy_files('data/sample', '{RAW}')"  # as the README says
    in_sourced_shell(cluster, f'python -c "{upload}"', cwd=project)
    out = in_sourced_shell(cluster, "dvc repro", cwd=project)  # with RAY_ADDRESS set
    assert set(re.findall(r"Running stage '(\w+)'", out)) == set(STAGES) - {"sample"}
    data = yaml.safe_load((project / "params.yaml").read_text())["data"]
    assert_spread(project, data, cluster)
    assert json.loads((project / data["shard_metrics"]).read_text())["inputs"] == {"train": 48, "val": 12}
    meta = ShardMeta.read(str(project / data["shards"]))
    assert all(f.uri.startswith(f"{SHARD_STORE}/") for f in meta.shard_files("parquet"))
    assert "16 of 16 shard files" in in_sourced_shell(cluster, "python -m cli.verify", cwd=project)
    ray_run = json.loads((project / data["model"] / "model.json").read_text())["ray_run"]
    with s3(cluster).open_input_file(f"alexnet/dvc/checkpoints/{ray_run}/pipeline_run.json") as f:
        assert json.loads(f.read()) == {"mlflow_run_id": run_id(project), "complete": True}
    assert not (project / "artifacts/checkpoints").exists()
    assert logged_epochs(cluster, project) == [1, 2]


def test_submitted_job_on_s3_then_both_runs_and_the_champion_on_the_server(
    cluster: Cluster, project: Path, tmp_path: Path
) -> None:
    # As the README says: from a folder every node sees, with relative paths for the small
    # local outputs (--shared-cwd), while the job runs in its own copy of the code.
    params = write_params(tmp_path, on_s3("job/checkpoints"))
    env = stage_env() | {"PYTHONPATH": str(ROOT)}
    submit = "python -m cli.submit --no-pip --shared-cwd --params params.yaml shard stats train evaluate"
    assert "SUCCEEDED" in in_sourced_shell(cluster, submit, env=env, cwd=tmp_path)
    assert_spread(tmp_path, yaml.safe_load(params.read_text())["data"], cluster)

    client = tracking(cluster)
    runs = mlflow.search_runs(experiment_names=["alexnet"], output_format="list")
    assert sorted(r.info.run_id for r in runs) == sorted({run_id(project), run_id(tmp_path)})
    champion = client.get_model_version_by_alias("alexnet", "champion")
    ws = project if champion.run_id == run_id(project) else tmp_path
    served = mlflow.pytorch.load_model("models:/alexnet@champion")
    exported_model, card = load_model(ws / "artifacts/model")
    x = np.random.default_rng(0).normal(size=(2, 3, card.crop, card.crop)).astype(np.float32)  # (B, 3, H, W)
    x = torch.from_numpy(x)
    with torch.no_grad():
        torch.testing.assert_close(served(x), exported_model(x), rtol=1e-5, atol=1e-5)
    stored = s3(cluster).get_file_info(pafs.FileSelector("alexnet/mlartifacts", recursive=True))
    assert any(i.base_name == "MLmodel" for i in stored), "the models' files are in the S3 artifact store"


def test_training_survives_a_killed_worker_node(cluster: Cluster, project: Path, tmp_path: Path) -> None:
    cluster, worker = worker_node(cluster)
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
    assert logged_epochs(cluster, tmp_path) == list(range(1, epochs + 1))
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


def test_shard_stage_survives_a_killed_worker_node(cluster: Cluster, project: Path, tmp_path: Path) -> None:
    cluster, worker = worker_node(cluster)
    killed_id = next(i for i, ip in node_ips(cluster).items() if ip == worker.ip)
    write_params(tmp_path, on_s3("unused"))
    proc = subprocess.Popen(
        sourced(cluster, "python -m stages.shard"), cwd=tmp_path, env=stage_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: running_task(worker, "write_shard"), proc, "a shard task on the worker", timeout=600)
    kill_node(cluster, worker.name)
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]

    assert files(tmp_path / "data/shards") == files(project / "data/shards")  # the same manifest
    metrics = json.loads((tmp_path / "metrics/shard.json").read_text())
    assert metrics["inputs"] == metrics["sharded"] == {"train": 48, "val": 12}
    assert sum(metrics["shards_per_node"].values()) == 8
    # The task the node was running was lost and ran again elsewhere.
    retried = _dashboard(cluster, "tasks", {"filter_keys": "name", "filter_predicates": "=",
                                            "filter_values": "write_shard"})  # fmt: skip
    again = [t for t in retried if t["attempt_number"] > 0 and t["state"] == "FINISHED"]
    assert again and all(t["node_id"] != killed_id for t in again), retried


def test_down_stops_the_services(cluster: Cluster) -> None:
    env = exported(cluster)
    addresses = [env[k].split("//")[1].split(":") for k in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL")]
    state = Path(cluster.state_dir)
    assert down(state)
    assert not any(port_open(host, int(port)) for host, port in addresses)
    assert not state.exists() and not Path(cluster.env_file).exists()
