"""DVC stage `evaluate`: centre-crop and 10-crop val error, reports, model registry."""

import json

from pipeline.config import load_params_or_exit
from pipeline.evaluate import evaluate


def main() -> None:
    """Reads params.yaml and evaluates the train stage's model on the val shards."""
    print(json.dumps(evaluate(load_params_or_exit()), indent=1))


if __name__ == "__main__":
    main()
