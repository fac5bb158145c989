"""Multi-node overhead: the shard stage and training on one Ray node against two.

The same stages (`python -m stages.shard`, `python -m stages.train`) on the same generated
sample (the sample profile of params.yaml: 3,000 train and 500 val images at 128 px; a
width-0.25 paper AlexNet at 112-px crops, batch 64), run twice:

- 1 node: each stage starts its own local Ray with this machine's CPUs (as `make run`
  does); one training worker (`train.cpus_per_worker: 1`);
- 2 nodes: `cli.localcluster`'s cluster (a head and a worker node, each a `ray start` in its
  own network namespace, `--cpus-per-node` logical CPUs each, default half the machine's
  cores, so that the cluster offers what the single node does: the nodes share the
  machine's cores); every stage a driver on the head node, as after `source cluster.env`;
  two training workers spread over the nodes (DDP over gloo across the node addresses),
  half a CPU each, the other half for the reads that feed them. Each node's threads
  (torch's, the shard tasks') are sized by the CPUs it offers, as on real nodes.

On one machine both nodes share its cores, so what the comparison measures is the cost of
the distribution itself (object transfer, gloo between namespaces, scheduling). Rates are
the stages' own: the shard stage's `images_per_s` (metrics/shard.json: the shard tasks,
after listing), training's per-epoch `images_per_s` (plots/train_history.csv: training
images over the training part of the epoch). Each is the best of several (the shard stage
run `--repeats` times, the epochs after the first): other work on a shared machine only
ever slows a run down, and a synchronous two-worker step waits for the slower worker, so
a load burst costs the two-node run more than the one-node run; the best of each is the
closest to what the setup itself delivers.
The run checks that the 2-node runs did use both nodes. Needs root (network namespaces).

The last line is `multinode_efficiency: X`: the lower of the two ratios (2-node images/s
over 1-node images/s) of the shard stage and of training.

Usage: .venv/bin/python benchmarks/scaling.py [--epochs 4] [--repeats 2] [--cpus-per-node C]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.stage_process import run_stage_process  # noqa: E402
from cli.localcluster import running  # noqa: E402
from cli.raynodes import Cluster  # noqa: E402


def write_params(ws: Path, epochs: int, workers: int) -> None:
    """The sample profile with `epochs` epochs and `workers` training workers, in `ws`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=epochs, num_workers=workers, placement="spread")
    params["train"]["cpus_per_worker"] = 1 if workers == 1 else 0.5
    params["mlflow"]["system_metrics"] = False
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage(ws: Path, name: str, cluster: Cluster | None) -> float:
    """Runs stage `name` in `ws` (a driver on `cluster`'s head, or on its own local Ray);
    returns its wall time in seconds. Exits with the stage's output when it fails."""
    command = f"python -m stages.{name}"
    if cluster is not None:
        command = f"source {shlex.quote(cluster.env_file)} && {command}"
    return run_stage_process(["bash", "-c", command], ws, name)[0]


def shard_rate(ws: Path, nodes: int) -> float:
    """The shard stage's images/s; checks that its tasks ran on `nodes` nodes."""
    metrics = json.loads((ws / "metrics/shard.json").read_text())
    used = len(metrics["shards_per_node"])
    if used != nodes:
        sys.exit(f"the shard tasks ran on {used} nodes, expected {nodes}: {metrics['shards_per_node']}")
    return metrics["images_per_s"]


def train_rate(ws: Path, nodes: int) -> float:
    """Training images/s of the fastest epoch after the first; checks that the workers ran
    on `nodes` nodes."""
    placements = json.loads((ws / "metrics/train.json").read_text())["worker_nodes"]
    if len(placements) != 1 or len(set(placements[0])) != nodes:
        sys.exit(f"the training workers ran on {placements}, expected {nodes} nodes in one attempt")
    with open(ws / "plots/train_history.csv") as f:
        rates = [float(row["images_per_s"]) for row in csv.DictReader(f)][1:]
    return max(rates)


def measure(ws: Path, epochs: int, repeats: int, cluster: Cluster | None) -> tuple[float, float]:
    """Shard stage (best of `repeats` runs) and training images/s on one local node
    (`cluster` None) or on `cluster`."""
    nodes = 1 if cluster is None else len(cluster.nodes)
    write_params(ws, epochs, workers=nodes)
    shard = 0.0
    for _ in range(repeats):
        seconds = stage(ws, "shard", cluster)
        shard = max(shard, rate := shard_rate(ws, nodes))
        print(f"{nodes} node(s): shard stage {rate:.1f} images/s ({seconds:.1f} s with start-up)", flush=True)
    stage(ws, "stats", cluster)
    seconds = stage(ws, "train", cluster)
    train = train_rate(ws, nodes)
    print(f"{nodes} node(s): training, {nodes} worker(s): {train:.1f} images/s ({seconds:.1f} s)", flush=True)
    return shard, train


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4, help="training epochs per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=2, help="shard stage runs per setup")
    half = max(1, os.cpu_count() // 2)
    ap.add_argument("--cpus-per-node", type=int, default=half, help=f"logical CPUs of each node ({half})")
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs: expected >= 2 (the first epoch is not timed)")
    if args.cpus_per_node < 1:
        ap.error("--cpus-per-node: expected >= 1")

    print(f"load avg before: {_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        one, two, where = Path(tmp, "one"), Path(tmp, "two"), Path(tmp, "cluster")
        for ws in (one, two, where):
            ws.mkdir()
        write_params(one, args.epochs, workers=1)
        stage(one, "sample", None)
        (two / "data").mkdir()
        (two / "data/sample").symlink_to(one / "data/sample")
        single = measure(one, args.epochs, args.repeats, None)
        print(f"load avg: {_load()}", flush=True)
        cpus = args.cpus_per_node
        with running(where / "state", where / "cluster.env", workers=1, cpus_per_node=cpus) as cluster:
            double = measure(two, args.epochs, args.repeats, cluster)
    print(f"load avg after: {_load()}", flush=True)
    shard_eff, train_eff = double[0] / single[0], double[1] / single[1]
    print(f"shard stage 2 nodes / 1 node: {shard_eff:.3f}")
    print(f"training 2 workers on 2 nodes / 1 worker on 1 node: {train_eff:.3f}")
    print(f"multinode_efficiency: {min(shard_eff, train_eff):.3f}")


if __name__ == "__main__":
    main()
