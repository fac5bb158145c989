"""DVC stage `sample`: the embedded ILSVRC-2012-shaped sample (the default data set)."""

import json
from pathlib import Path

from pipeline.config import load_params
from pipeline.data.sample import generate_sample


def main() -> None:
    """Writes the sample tree to data.sample from the `sample` params."""
    params = load_params()
    s = params.sample
    summary = generate_sample(
        Path(params.data.sample),
        num_classes=s.num_classes,
        train_per_class=s.train_per_class,
        val_per_class=s.val_per_class,
        seed=s.seed,
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
