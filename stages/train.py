"""DVC stage `train`: Ray Train AlexNet on the shards, tracked in MLflow, resumable."""

import sys

from pipeline.config import load_params_or_exit
from pipeline.storage import exit_when_out_of_space
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
    print(
        f"train: {summary['epochs_run']} epochs, val top-1 error {summary['val_top1_error']:.2%} "
        f"(best {summary['best_val_top1_error']:.2%}), train loss {summary['train_loss']:.3f}, "
        f"MLflow run {summary['mlflow_run_id']}"
    )


if __name__ == "__main__":
    with exit_when_out_of_space():
        main()
