"""DVC stage `sample`: the embedded ILSVRC-2012-shaped sample (the default data set)."""

from pipeline.config import load_params_or_exit
from pipeline.data.sample import generate_sample


def main() -> None:
    """Writes the sample tree to data.sample from the `sample` params."""
    params = load_params_or_exit()
    summary = generate_sample(params.data.sample, params.sample)
    print(f"sample: {summary['num_classes']} classes, layout {summary['layout']} -> {summary['root']}")


if __name__ == "__main__":
    main()
