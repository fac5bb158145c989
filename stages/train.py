"""DVC stage `train`: Ray Train AlexNet on the shards, tracked in MLflow, resumable."""

import json

from pipeline.config import load_params_or_exit
from pipeline.train.driver import train


def main() -> None:
    """Reads params.yaml and trains (or resumes the interrupted run of the same config)."""
    summary = train(load_params_or_exit())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
