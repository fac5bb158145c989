"""The Ray head of a real cluster (`make cluster-up`'s: a head and a worker node, each a
`ray start` in its own network namespace) killed while no stage runs, then started again on
the same address.

While it is down, the next stage stops within seconds with an error naming RAY_ADDRESS
(Ray's own `ray.init` would retry for minutes); once it is back, the next stage joins it
with the same token and gives the same result as the undisturbed stats stage (tiny_inputs',
on a local Ray: the stats do not depend on where their tasks ran).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from cli.localcluster import kill_node, running
from cli.raynodes import Cluster, restart_node, wait_for_states
from tests.conftest import stage_env


def stats_stage(cluster: Cluster, ws: Path, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """The stats stage (Ray tasks over the shards) run as a user would: after
    `source cluster.env`, whose `python` runs on the head node."""
    script = f"source {shlex.quote(cluster.env_file)} && cd {shlex.quote(str(ws))} && python -m stages.stats"
    env = stage_env()
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=timeout_s)


def test_stage_after_the_head_restarted(tiny_inputs: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(tiny_inputs, ws)
    stats = ws / "data/stats.json"
    expected = stats.read_bytes()
    stats.unlink()
    with running(tmp_path / "state", tmp_path / "cluster.env") as cluster:
        assert kill_node(cluster, "head")
        down = stats_stage(cluster, ws, timeout_s=180)  # without the check, ray.init retries far longer
        assert down.returncode != 0
        assert f"RAY_ADDRESS={cluster.gcs_address}: no Ray head answers there" in down.stderr
        assert not stats.exists()

        cluster = restart_node(cluster, "head")
        wait_for_states(cluster, {cluster.head.ip: "ALIVE"})
        after = stats_stage(cluster, ws)
        assert after.returncode == 0, after.stderr[-3000:]
        assert stats.read_bytes() == expected
