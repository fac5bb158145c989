"""DVC stage `evaluate`: centre-crop and 10-crop val error, reports, model registry."""

from pipeline.config import load_params_or_exit
from pipeline.evaluate import evaluate


def main() -> None:
    """Reads params.yaml and evaluates the train stage's model on the val shards."""
    m = evaluate(load_params_or_exit())
    ten = f", 10-crop {m['top1_error_10crop']:.2%}" if "top1_error_10crop" in m else ""
    print(f"evaluate: val top-1 error {m['top1_error']:.2%} (centre){ten} on {m['num_images']} images; "
          f"registered as version {m['model_version']}")  # fmt: skip


if __name__ == "__main__":
    main()
