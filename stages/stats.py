"""DVC stage `stats`: training-set mean, std and RGB eigenpairs for PCA lighting."""

from pipeline.cluster import init_ray
from pipeline.config import load_params_or_exit
from pipeline.data.stats import compute_stats


def main() -> None:
    """Computes the statistics over data.shards' train split into data.stats."""
    params = load_params_or_exit()
    data = params.data
    init_ray()
    stats = compute_stats(data.shards, fmt=data.format, max_shards=params.stats.max_shards)
    stats.write(data.stats)
    mean = ", ".join(f"{v:.3f}" for v in stats.mean)
    eigval = ", ".join(f"{v:.4f}" for v in stats.eigval)
    print(f"stats: {stats.num_images} train images, RGB mean ({mean}), eigenvalues ({eigval}): {data.stats}")


if __name__ == "__main__":
    main()
