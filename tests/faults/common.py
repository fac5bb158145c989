"""Values the fault tests share."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.stats import ColorStats

# Plausible training-set statistics (pixels in [0, 1]), as the stats stage writes them.
STATS = ColorStats(
    mean=(0.48, 0.45, 0.40),
    std=(0.23, 0.22, 0.22),
    eigval=(0.055, 0.0047, 0.0006),
    eigvec=((-0.57, 0.70, 0.41), (-0.58, -0.008, -0.81), (-0.58, -0.70, 0.40)),
    cov=((0.05, 0.04, 0.04), (0.04, 0.05, 0.04), (0.04, 0.04, 0.05)),
    num_images=48,
    num_pixels=307200,
)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root, by path relative to it."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
