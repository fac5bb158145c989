"""Training throughput of the project's networks on this CPU.

Forward + backward (cross-entropy, no optimiser step) at one batch size for the
paper's AlexNet and torchvision's variant at their native inputs (227 / 224, 1000
classes) and the CIFAR-10 net at 32x32 (10 classes). Also prints parameters and
multiply-accumulates per image (conv + linear, via FlopCounterMode; torchvision's
"GFLOPS" for AlexNet is this count). The last line is
``paper_vs_torchvision_train_ratio: X``, paper img/s over torchvision img/s.

Usage: .venv/bin/python benchmarks/model.py [--batch 32] [--steps 5] [--warmup 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import ARCHS, build_model, input_size  # noqa: E402

NUM_CLASSES = {"paper": 1000, "torchvision": 1000, "cifar": 10}


def gmacs_per_image(model: nn.Module, size: int) -> float:
    """Conv + linear multiply-accumulates of one (3, size, size) image, in billions."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2e9  # FlopCounterMode counts a MAC as 2 FLOPs


def train_images_per_s(model: nn.Module, size: int, batch: int, steps: int, warmup: int) -> float:
    """Forward + backward images per second over ``steps`` timed steps after ``warmup``."""
    model.train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, model(x[:1]).shape[1], (batch,))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    """Benchmarks every arch and prints a table, then the paper/torchvision ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1, --warmup >= 0")

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'model':<12} {'input':>5} {'params':>12} {'GMACs/img':>10} {'train img/s':>12}")
    rate = {}
    for arch in ARCHS:
        model = build_model(arch, num_classes=NUM_CLASSES[arch])
        size = input_size(arch)
        params = sum(p.numel() for p in model.parameters())
        gmacs = gmacs_per_image(model, size)
        rate[arch] = train_images_per_s(model, size, args.batch, args.steps, args.warmup)
        print(f"{arch:<12} {size:>5} {params:>12,} {gmacs:>10.4f} {rate[arch]:>12.1f}")
    print(f"paper_vs_torchvision_train_ratio: {rate['paper'] / rate['torchvision']:.3f}")


if __name__ == "__main__":
    main()
