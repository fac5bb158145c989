"""DVC stage `train`: Ray Train AlexNet on the shards, tracked in MLflow, resumable."""

import json
import sys

from pipeline.config import load_params_or_exit
from pipeline.train.divergence import TrainingDiverged
from pipeline.train.driver import train

DIVERGED_EXIT = 3  # a run that trained but learnt nothing: not a crash (1), not bad params (2)


def main() -> None:
    """Reads params.yaml and trains (or resumes the interrupted run of the same config)."""
    try:
        summary = train(load_params_or_exit())
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(DIVERGED_EXIT) from None
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
