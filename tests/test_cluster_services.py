"""`make cluster-up`'s services beside the Ray nodes (`up --services`): moto's S3 server,
PostgreSQL and an `mlflow server` on the cluster's bridge address; every node's Ray
processes get the S3 settings, so the shard stage, a driver on the head node, has its
tasks on both nodes write the shards to S3; cluster.env (0600) gives drivers the tracking
server; `down` stops the services too.
"""

from __future__ import annotations

import json
import shlex
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.localcluster import down, running
from cli.procs import port_open
from cli.raynodes import Cluster
from pipeline.data.shards import ShardMeta
from tests.conftest import in_sourced_shell, run_stage, write_params


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    where = tmp_path_factory.mktemp("servicescluster")
    with running(where / "state", where / "cluster.env", services=True) as up:
        yield up


def exported(cluster: Cluster) -> dict[str, str]:
    lines = Path(cluster.env_file).read_text().splitlines()
    pairs = (line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    return {k: shlex.split(v)[0] if v else "" for k, v in pairs}


def test_env_file_names_the_services_on_the_bridge_and_is_private(cluster: Cluster) -> None:
    env = exported(cluster)
    assert env["MLFLOW_TRACKING_URI"].startswith(f"http://{cluster.bridge_ip}:")
    assert env["AWS_ENDPOINT_URL"].startswith(f"http://{cluster.bridge_ip}:")
    assert env["AWS_SECRET_ACCESS_KEY"] and stat.S_IMODE(Path(cluster.env_file).stat().st_mode) == 0o600


def test_shard_tasks_on_both_nodes_write_to_s3_and_drivers_reach_mlflow(
    cluster: Cluster, tmp_path: Path
) -> None:
    write_params(tmp_path, {"data": {"shard_store": "s3://alexnet/cluster-shards"}})
    run_stage(tmp_path, "sample")
    in_sourced_shell(cluster, f"cd {shlex.quote(str(tmp_path))} && python -m stages.shard")
    meta = ShardMeta.read(str(tmp_path / "data/shards"))
    assert all(f.uri.startswith("s3://alexnet/cluster-shards/") for f in meta.shard_files("parquet"))
    metrics = json.loads((tmp_path / "metrics/shard.json").read_text())
    assert len(metrics["shards_per_node"]) == 2  # both nodes' workers wrote to S3
    check = "from pipeline import tracking; print(tracking.connect())"  # the preflight of train/evaluate
    assert (
        in_sourced_shell(cluster, f"python -c {shlex.quote(check)}").strip()
        == exported(cluster)["MLFLOW_TRACKING_URI"]
    )
    ok = in_sourced_shell(cluster, f"cd {shlex.quote(str(tmp_path))} && python -m cli.verify")
    assert "8 of 8 shard files" in ok


def test_down_stops_the_services(cluster: Cluster) -> None:
    env = exported(cluster)
    addresses = [env[k].split("//")[1].split(":") for k in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL")]
    state = Path(cluster.state_dir)
    assert down(state)
    assert not any(port_open(host, int(port)) for host, port in addresses)
    assert not state.exists() and not Path(cluster.env_file).exists()
