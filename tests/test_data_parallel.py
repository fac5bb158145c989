"""Data parallelism with real Ray Train and gloo: two workers equal one, every image counted once."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from models import unwrap
from pipeline.config import ModelParams, TrainParams
from pipeline.train.batches import READ_CPUS, step_totals
from pipeline.train.loop import prepare_ddp, train_epoch
from pipeline.train.model_card import build_network

MODEL = ModelParams(width=0.125, dropout=0.0, init="kaiming")  # no dropout: steps are deterministic
RECIPE = TrainParams(batch_size=8, crop=67, lr=0.05, num_workers=2, cpus_per_worker=0.5)


# Which images of a fixed set of 12 each worker steps on: (start, end) per step. Two steps
# of the global batch of 8: the second holds the 4 left. With two workers the first step
# is split evenly (the batch split of the loop) and the second falls to worker 0 alone,
# as when the shares of an epoch differ: worker 1 then steps on nothing.
PLANS = {1: [[(0, 8), (8, 12)]], 2: [[(0, 4), (8, 12)], [(4, 8)]]}
TOTALS = step_totals([12], RECIPE.batch_size)  # [8, 4], whatever the number of workers
IDLE_KILL_S = 1.0  # Ray's idle_worker_killing_time_threshold_ms


def two_steps(config: dict) -> None:
    """Ray Train worker: this worker's part of two steps on fixed images."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, RECIPE.crop, RECIPE.crop, generator=g)  # (12, 3, 67, 67)
    y = torch.randint(0, 3, (12,), generator=g)
    batches = [(x[a:b], y[a:b]) for a, b in PLANS[world][rank]]
    torch.manual_seed(0)
    model = prepare_ddp(build_network(MODEL, 3))
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE.lr, momentum=0.9, weight_decay=5e-4)
    sums = train_epoch(model, opt, batches, TOTALS, RECIPE, torch.device("cpu"))
    counted = sums.all_reduced(torch.device("cpu")).images
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            torch.save(unwrap(model).state_dict(), Path(tmp) / "weights.pt")
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"images": counted}, checkpoint=checkpoint)


def step_weights(workers: int, storage: Path) -> tuple[dict[str, torch.Tensor], float]:
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    result = TorchTrainer(
        two_steps,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=f"two-steps-{workers}", storage_path=str(storage)),
    ).fit()
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "weights.pt", weights_only=True), result.metrics["images"]


def test_step_totals_pair_every_workers_steps() -> None:
    assert step_totals([12], 8) == [8, 4]
    assert step_totals([8, 4], 4) == [8, 4]  # worker 1 steps on nothing in the second step
    assert step_totals([5, 5, 0], 2) == [4, 4, 2]  # a worker without rows still steps


def test_two_workers_steps_equal_one_workers(ray_local: None, tmp_path: Path) -> None:
    one, n_one = step_weights(1, tmp_path)
    two, n_two = step_weights(2, tmp_path)
    assert n_one == n_two == 12  # counts summed over workers: every image once
    torch.manual_seed(0)
    start = build_network(MODEL, 3).state_dict()
    assert any(not torch.equal(one[k], start[k]) for k in one), "the step changed nothing"
    for k in one:  # each step's gradient is the mean over its images, however they are spread
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def test_resource_check_counts_each_node_and_the_reads(ray_local: None) -> None:
    """On the 2-CPU local node: two half-CPU workers fit beside their reads; two whole-CPU
    workers leave nothing to read with; three can never be placed. Each error names the
    request and the nodes' CPUs."""
    from pipeline.train.driver import check_resources

    check_resources(TrainParams(num_workers=2, cpus_per_worker=0.5))
    check_resources(TrainParams(batch_size=96, num_workers=3, cpus_per_worker=0.5))
    with pytest.raises(ValueError, match=r"cpus_per_worker=1 reserve 2 .* need 0.5 more"):
        check_resources(TrainParams(num_workers=2, cpus_per_worker=1.0))
    with pytest.raises(ValueError, match=r"nodes have 2 CPUs, room for 2 such workers"):
        check_resources(TrainParams(batch_size=96, num_workers=3, cpus_per_worker=1.0))
    with pytest.raises(ValueError, match=r"room for 1 such workers"):
        check_resources(TrainParams(num_workers=2, cpus_per_worker=1.5))


def test_the_node_keeps_its_read_tasks_processes_beside_training_actors(ray_local: None) -> None:
    """Two zero-CPU actors (as Ray Train's controller and a worker) and four half-CPU read
    tasks at once, each in its own process: once Ray's idle-worker timeout has passed the
    read tasks' processes must still be there, or every epoch's shard reads start new
    processes (`pipeline.cluster.worker_pool_env`)."""
    import ray

    @ray.remote(num_cpus=0)
    class Holder:
        def pid(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0)
    class Gate:
        """Releases its callers once `n` have arrived: they run at once, in n processes."""

        def __init__(self, n: int) -> None:
            self.n, self.arrived, self.open = n, 0, asyncio.Event()

        async def arrive(self) -> None:
            self.arrived += 1
            if self.arrived == self.n:
                self.open.set()
            await self.open.wait()

    @ray.remote(num_cpus=READ_CPUS)
    def reader(gate) -> int:
        ray.get(gate.arrive.remote())
        return os.getpid()

    holders = [Holder.remote() for _ in range(2)]
    ray.get([h.pid.remote() for h in holders])
    reads = int(ray.cluster_resources()["CPU"] / READ_CPUS)  # as many as the node runs at once
    gate = Gate.remote(reads)
    pids = set(ray.get([reader.remote(gate) for _ in range(reads)]))
    assert len(pids) == reads
    time.sleep(IDLE_KILL_S * 3)  # what is tested is the pool once the timeout has passed
    assert [pid for pid in pids if not psutil.pid_exists(pid)] == [], "the node killed idle read processes"
    del holders, gate
