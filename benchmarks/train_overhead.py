"""Ray Train's overhead: training images/s through a TorchTrainer against a plain PyTorch loop.

Both run the same step (forward, cross-entropy, backward, SGD-momentum step, as
pipeline.train.loop's `train_epoch`) of the same network on the same in-memory batches,
regenerated from one seed in each process, with the same `torch.set_num_threads`; neither
reads or augments data, so the difference is what Ray Train adds: the worker process,
`prepare_model` (DDP on several workers), and a `ray.train.report` per epoch as the real
loop makes. Warm-up steps are excluded from both timings. The plain loop runs twice, before
and after the trainer, on the same idle local Ray (cores shared with other users: the load
average is printed); its mean is the reference.

Default: the sample profile's network (paper AlexNet, width 0.25, 10 classes) at 112-px
crops, batch 64. The last line is `ray_train_overhead_pct: X`,
100 * (plain images/s / Ray Train images/s - 1).

Usage: .venv/bin/python benchmarks/train_overhead.py [--width 0.25] [--crop 112] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import build_model  # noqa: E402
from pipeline.cluster import start_local_ray  # noqa: E402

NUM_CLASSES = 10
DISTINCT_BATCHES = 4  # cycled: enough to be real tensors, few enough to stay in cache-friendly memory


def make_batches(cfg: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same (x (B, 3, crop, crop) float32, y (B,) int64) batches in every process."""
    g = torch.Generator().manual_seed(cfg["seed"])
    b, c = cfg["batch"], cfg["crop"]
    return [
        (torch.randn(b, 3, c, c, generator=g), torch.randint(0, NUM_CLASSES, (b,), generator=g))
        for _ in range(DISTINCT_BATCHES)
    ]


def make_model(cfg: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The network and optimiser of the sample profile (He init), from one seed."""
    torch.manual_seed(cfg["seed"])
    model = build_model("paper", num_classes=NUM_CLASSES, width=cfg["width"], init="kaiming")
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One SGD step, as `train_epoch` does; returns the loss (a host sync, as there)."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def timed_epochs(cfg: dict[str, Any], report=None) -> float:
    """Runs warm-up then timed epochs; returns timed images/s.

    Args:
        cfg: Benchmark settings (see main).
        report: Called with (epoch metrics) after every epoch, as the real loop reports
            to Ray Train; None for the plain loop.
    """
    torch.set_num_threads(cfg["threads"])
    batches = make_batches(cfg)
    model, opt = make_model(cfg)
    if report is not None:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    model.train()
    for i in range(cfg["warmup"]):
        train_step(model, opt, *batches[i % DISTINCT_BATCHES])
    start = time.perf_counter()
    step = 0
    for epoch in range(cfg["epochs"]):
        loss = 0.0
        for _ in range(cfg["steps"]):
            loss += train_step(model, opt, *batches[step % DISTINCT_BATCHES])
            step += 1
        if report is not None:
            report({"epoch": epoch + 1, "train_loss": loss / cfg["steps"]})
    seconds = time.perf_counter() - start
    return step * cfg["batch"] / seconds


def ray_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train worker: the timed loop, then its images/s in a final report."""
    import ray.train

    rate = timed_epochs(cfg, report=ray.train.report)
    with tempfile.TemporaryDirectory() as tmp:
        # Train V2's Result.metrics are those of the last report with a checkpoint.
        ray.train.report({"images_per_s": rate}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_train_rate(cfg: dict[str, Any], storage: str) -> float:
    """Images/s measured inside one TorchTrainer worker (1 CPU reserved, as the sample profile)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="train-overhead", storage_path=storage),
    )
    return trainer.fit().metrics["images_per_s"]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4, help="timed epochs (one report each)")
    ap.add_argument("--steps", type=int, default=40, help="steps per epoch")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both loops")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = vars(args)

    import ray

    print(f"load avg before: {_load()}", flush=True)
    start_local_ray(num_cpus=os.cpu_count(), quiet=True, state_api=True)
    plain = [timed_epochs(cfg)]
    print(f"plain loop: {plain[0]:.1f} images/s (load avg: {_load()})", flush=True)
    with tempfile.TemporaryDirectory() as storage:
        on_ray = ray_train_rate(cfg, storage)
    print(f"Ray Train (TorchTrainer, 1 worker): {on_ray:.1f} images/s (load avg: {_load()})", flush=True)
    plain.append(timed_epochs(cfg))
    print(f"plain loop again: {plain[1]:.1f} images/s (load avg: {_load()})", flush=True)
    ray.shutdown()
    reference = sum(plain) / len(plain)
    print(f"ray_train_overhead_pct: {100 * (reference / on_ray - 1):.1f}")


if __name__ == "__main__":
    main()
