#!/usr/bin/env bash
# GPU smoke benchmark of the paper's full recipe: a few hundred training steps of AlexNet
# (width 1.0, 227 crops, batch 128, bf16 autocast, channels_last) on CUDA, fed by the GPU
# input path (GpuTrainAugment: batched torchvision.io.decode_jpeg on the device).
#
# Self-contained: generates a small synthetic ILSVRC-shaped sample (pipeline.data.sample),
# shards it at 256 px (write_shards on a local Ray), holds the JPEG bytes in memory and
# trains on them. Prints training images/s, peak GPU memory, and the input path alone
# vs the model alone (synthetic tensors) to say which one bounds training. Sized to take
# minutes on one data-centre GPU. Fails with exit status 2 and a clear message without CUDA.
#
# Usage (repository root): benchmarks/gpu_check.sh [--steps 300] [--batch 128]
#   dry run of the non-CUDA logic: benchmarks/gpu_check.sh --device cpu --steps 3 --batch 8
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[[ -x $PY ]] || { echo "gpu_check: $PY not found (run from a checkout with its venv)" >&2; exit 2; }
exec "$PY" - "$@" <<'EOF'
"""The Python part of benchmarks/gpu_check.sh (see there)."""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F

from models import build_model
from pipeline.config import SampleParams
from pipeline.data.stats import ColorStats
from pipeline.transforms import GpuTrainAugment
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.sample import generate_sample
from pipeline.config import ShardParams
from pipeline.data.shard_writer import write_shards
from pipeline.data.shards import ShardMeta, iter_shard
from pipeline.train.batches import batch_rng

STATS = ColorStats(  # the usual ImageNet values (fb.resnet.torch's): the check measures speed only
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    eigval=(0.2175, 0.0188, 0.0045),
    eigvec=((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203)),
)
NUM_CLASSES = 1000  # the paper's fc8, whatever the sample holds

ap = argparse.ArgumentParser(prog="gpu_check.sh")
ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the logic)")
ap.add_argument("--steps", type=int, default=300, help="timed training steps")
ap.add_argument("--warmup", type=int, default=10)
ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--crop", type=int, default=227)
ap.add_argument("--train-per-class", type=int, default=100, help="sample images per class (10 classes)")
args = ap.parse_args()



def die(message: str) -> None:
    """Stops with exit status 2 and `message` on stderr."""
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(2)


device = torch.device(args.device)
if device.type == "cuda" and not torch.cuda.is_available():
    die(f"no CUDA device visible to torch {torch.__version__} (CUDA build {torch.version.cuda}); "
             "this check needs a GPU (dry run elsewhere: --device cpu --steps 3 --batch 8)")


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(n: int, fn) -> float:
    """Seconds per call of fn over n calls after 2 untimed ones (device work included)."""
    for _ in range(2):
        fn(0)
    sync()
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    sync()
    return (time.perf_counter() - start) / n


with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    generate_sample(Path(tmp) / "raw", SampleParams(num_classes=10, train_per_class=args.train_per_class, val_per_class=1))
    catalog = ingest_imagenet(str(Path(tmp) / "raw"))
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    write_shards(catalog.records, Path(tmp) / "shards", classes=catalog.classes,
                 settings=ShardParams(size=256, format="parquet", shard_size=500), progress=False)
    ray.shutdown()
    rows = [r for f in ShardMeta.read(str(Path(tmp) / "shards")).files("train", "parquet") for r in iter_shard(f, "parquet")]
jpegs, labels = [r[2] for r in rows], np.array([r[1] for r in rows])
print(f"sample: {len(jpegs)} train JPEGs at 256 px, {np.mean([len(b) for b in jpegs]) / 1e3:.0f} KB mean "
      f"(ready in {time.perf_counter() - t0:.0f} s)", flush=True)
if len(jpegs) < args.batch:
    die(f"{len(jpegs)} images < batch {args.batch}: raise --train-per-class")

augment = GpuTrainAugment(STATS, args.crop, 0.1, device)
n_batches = len(jpegs) // args.batch


def input_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` (cycling over the sample): (B, 3, crop, crop) float32 on the device, (B,)."""
    i = (step % n_batches) * args.batch
    x = augment(jpegs[i : i + args.batch], batch_rng(0, 0, 0, step))
    return x, torch.as_tensor(labels[i : i + args.batch], device=device)


torch.manual_seed(0)
model = build_model("paper", num_classes=NUM_CLASSES, width=1.0).to(device, memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
model.train()


def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
    """One bf16-autocast SGD step on channels_last input, as pipeline.train.loop does."""
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
for step in range(args.warmup):
    train_step(*input_batch(step))
sync()
start = time.perf_counter()
for step in range(args.steps):
    train_step(*input_batch(args.warmup + step))
sync()
train_rate = args.steps * args.batch / (time.perf_counter() - start)

n_part = max(3, args.steps // 4)
input_rate = args.batch / timed(n_part, lambda i: input_batch(i)[0].sum())  # sum: forces the work
x_syn = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
y_syn = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
model_rate = args.batch / timed(n_part, lambda i: train_step(x_syn, y_syn))
memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (cpu)"

print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (dry run)'}")
print(f"training: {train_rate:.1f} images/s ({args.steps} steps, batch {args.batch}, crop {args.crop}, "
      "width 1.0, bf16, channels_last, GpuTrainAugment)")
print(f"peak GPU memory (max_memory_allocated): {memory}")
print(f"input alone (decode + augment on {device.type}): {input_rate:.1f} images/s")
print(f"model alone (synthetic tensors): {model_rate:.1f} images/s")
# Input and model run one after the other on the same stream, so training is at most the
# slower of the two; the bottleneck is whichever rate is lower.
bottleneck = "input" if input_rate < model_rate else "model"
print(f"bottleneck: {bottleneck} (input/model rate ratio {input_rate / model_rate:.2f})")
print(f"gpu_train_images_per_s: {train_rate:.1f}")
EOF
