"""`make paper`: the paper's ablations as DVC experiments, then a report on them.

Queues one DVC experiment per switch plus the baseline and the Figure-1 pair (`dvc exp run --queue`, each one
isolated: its own params on top of the workspace's, in its own temp workspace), runs them
one after another (`dvc exp run --run-all`), and writes `reports/paper.md` and
`reports/paper.html` from their MLflow runs (cli.paper_report).

Every run of a set logs into one MLflow experiment (`alexnet-paper`, models registered as
`alexnet-paper`, so no ablation ever becomes the main model's `candidate`), and carries
the tag `paper_set=<set>`: the runs page filtered on it, or the compare link in the
report, shows exactly this set. The queued workspaces are temporary, so the experiment is
created here first with its artifacts in this checkout's `mlruns/`, and the queue workers
inherit MLFLOW_TRACKING_URI pointing at this checkout's store.

    python -m cli.paper                      # the whole set, then the report
    python -m cli.paper --only baseline,lrn  # a subset
    python -m cli.paper --report-only 20261129-0700   # redraw the report of a set
    python -m cli.paper --cifar ~/data/cifar-10-batches-py   # Figure 1 on CIFAR-10
    python -m cli.paper --params params-imagenet.yaml        # the set on ImageNet (GPUs)

The ReLU-vs-tanh comparison of the paper's Figure 1 is two more runs of the set
(`fig1-relu`, `fig1-tanh`): the four-layer CIFAR net (models/cifar_net.py) on CIFAR-10
when it is there (--cifar, or data/cifar-10-batches-py), else on the CIFAR-format set the
sample stage generates (`sample.layout: cifar10`, pipeline/data/sample_cifar.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking, yamlfile
from pipeline.config import ParamsError, load_params

EXPERIMENT = "alexnet-paper"
REGISTERED_MODEL = "alexnet-paper"
REPORTS = Path("reports")


@dataclass(frozen=True)
class Ablation:
    """One run of the paper set: what it switches and what the paper says about it.

    Attributes:
        name: Short name; the DVC experiment is `paper-<set>-<name>`.
        overrides: `dvc exp run -S` values on top of the workspace's params.yaml.
        claim: The paper's claim the run tests.
        paper_delta: The paper's change of val top-1 error (points) when the feature is
            switched off (../shared/spec/alexnet.md), None where it gives no number.
        paper_source: Where that number comes from.
    """

    name: str
    overrides: tuple[str, ...]
    claim: str
    paper_delta: float | None
    paper_source: str


# The spec's numbers: LRN -1.4 / -1.2 (top-1/top-5), overlapping pooling -0.4 / -0.3,
# PCA lighting "over 1%" top-1, dropout and ReLU vs tanh without a top-1 number.
ABLATIONS: tuple[Ablation, ...] = (
    Ablation("baseline", (), "the paper's network and recipe (sample profile)", None, ""),
    Ablation(
        "no-lrn", ("model.lrn=false",), "local response normalisation lowers top-1 error", 1.4,
        "paper section 3.3: LRN reduces top-1/top-5 error by 1.4% / 1.2%",
    ),
    Ablation(
        "nonoverlap", ("model.pooling=nonoverlap",), "overlapping pooling (3/2) lowers top-1 error vs 2/2",
        0.4, "paper section 3.4: overlapping pooling reduces top-1/top-5 error by 0.4% / 0.3%",
    ),
    Ablation(
        "no-pca", ("train.pca_std=0.0",), "PCA colour lighting lowers top-1 error", 1.0,
        "paper section 4.1: fancy PCA reduces top-1 error by over 1%",
    ),
    Ablation(
        "no-dropout", ("model.dropout=0.0",), "dropout lowers val error (less overfitting)", None,
        "paper section 4.2: without dropout the network overfits substantially (no number)",
    ),
    Ablation(
        "tanh", ("model.activation=tanh",), "ReLU trains faster than tanh and ends lower", None,
        "paper section 3.1, Figure 1: ReLU reaches 25% train error 6x faster (CIFAR-10, 4-layer net)",
    ),
)  # fmt: skip

# The paper's Figure 1: the four-layer CIFAR net, ReLU against tanh, epochs to 25% train
# error, "no regularization of any kind" (no dropout, weight decay, PCA lighting; flips
# only) and no warmup (the paper had none, and it would delay both curves). One lr for
# both: on the generated set lr 0.003 to 0.01 was about as fast for either, 0.03 stalled
# both (README "Figure 1"). The data overrides come from figure1_data().
FIGURE1_RECIPE = (
    "model.arch=cifar", "model.lrn=false", "model.groups=1", "model.init=paper", "model.dropout=0.0",
    "model.width=1.0", "model.pooling=overlap", "shard.source=cifar10", "shard.size=32", "train.crop=32",
    "train.pca_std=0.0", "train.weight_decay=0.0", "train.warmup_epochs=0", "train.batch_size=32",
    "train.lr=0.01", "train.epochs=12", "train.schedule=step", "train.step_size=12",
    "evaluate.ten_crop=false",
)  # fmt: skip
FIGURE1_SOURCE = "paper section 3.1, Figure 1: ReLU reaches 25% train error 6x faster than tanh (CIFAR-10)"
FIGURE1: tuple[Ablation, ...] = tuple(
    Ablation(f"fig1-{act}", (*FIGURE1_RECIPE, f"model.activation={act}"),
             f"Figure 1, four-layer CIFAR net with {act}", None, FIGURE1_SOURCE)
    for act in ("relu", "tanh")
)  # fmt: skip
# The generated CIFAR-format set when the user has no CIFAR-10: 200 32-px images per class.
GENERATED_CIFAR = ("sample.layout=cifar10", "sample.train_per_class=200", "sample.val_per_class=50")
DEFAULT_CIFAR = Path("data/cifar-10-batches-py")
BY_NAME = {a.name: a for a in (*ABLATIONS, *FIGURE1)}


def is_figure1(ablation: Ablation) -> bool:
    """Whether a run belongs to the Figure-1 pair rather than to the ablations (by name:
    `python -m cli.paper` holds this module twice, as __main__ and as cli.paper)."""
    return ablation.name in {a.name for a in FIGURE1}


def switch_text(ablation: Ablation) -> str:
    """What a run switches, for tables: its overrides, or for Figure 1 its activation."""
    if is_figure1(ablation):
        return f"Figure-1 CIFAR net recipe, {ablation.overrides[-1]}"
    return " ".join(ablation.overrides) or "(none)"


def figure1_data(cifar: Path | None, sample: str) -> tuple[str, ...]:
    """The Figure-1 runs' data overrides: CIFAR-10 at `cifar` (`cifar-10-batches-py` or its
    parent) when given, else the CIFAR-format set the sample stage writes to `sample`
    (data.sample), which the shard stage then reads.

    Raises:
        SystemExit: `cifar` has no `batches.meta`, naming the path.
    """
    if cifar is None:
        return (*GENERATED_CIFAR, f"data.raw={json.dumps(sample)}")
    root = cifar if (cifar / "batches.meta").is_file() else cifar / "cifar-10-batches-py"
    if not (root / "batches.meta").is_file():
        raise SystemExit(f"error: --cifar {cifar}: expected CIFAR-10's python batches (batches.meta) there")
    return (f"data.raw={json.dumps(str(root.resolve()))}",)


def params_overrides(path: Path, workspace: Path = Path("params.yaml")) -> tuple[str, ...]:
    """`section.key=value` for every param of the file `path` that differs from the
    workspace's params.yaml: what makes each queued experiment run on `path`'s params.

    Raises:
        SystemExit: `path` is not a valid params file (the message names the key).
    """
    try:
        load_params(path)
    except ParamsError as e:
        raise SystemExit(f"error: --params {path}: {e}") from None
    ours, theirs = (yamlfile.load(p) or {} for p in (workspace, path))
    return tuple(
        f"{section}.{key}={json.dumps(value)}"
        for section, values in theirs.items()
        for key, value in (values or {}).items()
        if (ours.get(section) or {}).get(key, object()) != value
    )


def exp_name(set_id: str, ablation: str) -> str:
    """The DVC experiment (and MLflow dvc_exp_name tag) of one run of a set."""
    return f"paper-{set_id}-{ablation}"


def _dvc(*args: str, env: dict[str, str] | None = None, check: bool = True) -> int:
    """Runs the dvc CLI here, its output going to the console."""
    rc = subprocess.run(["dvc", *args], env=env, check=False).returncode
    if check and rc:
        raise SystemExit(f"error: `dvc {' '.join(args)}` exited with status {rc}")
    return rc


def prepare_experiment() -> str:
    """Creates the MLflow experiment (artifacts in this checkout's mlruns/, which outlives
    the queue's temp workspaces) unless it exists; returns its id."""
    import mlflow

    tracking.connect()
    if not mlflow.get_experiment_by_name(EXPERIMENT):
        # A local store keeps artifacts beside it; a tracking server decides for itself.
        local = tracking.tracking_uri().startswith("sqlite:")
        artifacts = Path("mlruns").resolve().as_uri() if local else None
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    return tracking.use_experiment(EXPERIMENT)


@dataclass(frozen=True)
class Plan:
    """What every queued experiment gets on top of the workspace's params.

    Attributes:
        base: A params file's differences (--params), first.
        figure1: The Figure-1 pair's data overrides (figure1_data), after its recipe.
        extra: The command line's -S values, last: `-S train.epochs=2` shortens them all.
    """

    base: tuple[str, ...]
    figure1: tuple[str, ...]
    extra: tuple[str, ...]


def queue_and_run(set_id: str, ablations: list[Ablation], plan: Plan) -> None:
    """Queues one DVC experiment per ablation, then runs the queue (serially: 2 cores)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    if not plan.base and not all(map(is_figure1, ablations)):
        # The shared inputs built once here; the experiments find them in DVC's cache. With
        # another params file the first experiment builds them, the others take them from
        # DVC's run cache.
        _dvc("repro", "stats", env=env)
    common = [f"mlflow.experiment={EXPERIMENT}", f"mlflow.registered_model={REGISTERED_MODEL}"]
    for a in ablations:
        data = plan.figure1 if is_figure1(a) else ()
        values = (*plan.base, *common, *a.overrides, *data, *plan.extra)
        sets = [arg for value in values for arg in ("-S", value)]
        _dvc("exp", "run", "--queue", "-n", exp_name(set_id, a.name), *sets, env=env)
    # A failed (e.g. diverged) experiment is reported, not fatal: the report says which.
    _dvc("exp", "run", "--run-all", "-j", "1", env=env, check=False)


def main(argv: list[str] | None = None) -> int:
    """Command line: queue and run the set (or a subset), then write the report.

    Returns:
        0 when the report was written.
    """
    parser = argparse.ArgumentParser(prog="python -m cli.paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BY_NAME)}")
    parser.add_argument("--set", dest="set_id", help="set id (default: the UTC time)")
    parser.add_argument("-S", "--set-param", action="append", default=[], help="extra dvc -S override")
    parser.add_argument("--report-only", metavar="SET", help="only (re)write the report of SET")
    parser.add_argument("--out", type=Path, default=REPORTS, help="report folder (default: reports)")
    parser.add_argument(
        "--cifar", type=Path, help=f"CIFAR-10's cifar-10-batches-py for Figure 1 (default: {DEFAULT_CIFAR} "
        "when it exists, else a generated CIFAR-format set)",
    )  # fmt: skip
    parser.add_argument(
        "--params", type=Path, help="run the set on this params file (e.g. params-imagenet.yaml) instead of "
        "params.yaml: its differences go to every experiment as -S values; params.yaml stays as it is",
    )  # fmt: skip
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"--only {unknown[0]!r}: expected one of {', '.join(BY_NAME)}")
    if "baseline" not in names and not all(is_figure1(BY_NAME[n]) for n in names):
        parser.error("--only: the ablations need their baseline (every delta is against it)")
    if len({n for n in names if is_figure1(BY_NAME[n])}) == 1:
        parser.error("--only: Figure 1 needs both of fig1-relu and fig1-tanh")
    ablations = [BY_NAME[n] for n in names]
    # A wrong --params or --cifar stops here, before any training.
    base = params_overrides(args.params) if args.params else ()
    cifar = args.cifar or (DEFAULT_CIFAR if DEFAULT_CIFAR.is_dir() else None)
    data = figure1_data(cifar, load_params(args.params or "params.yaml").data.sample)
    prepare_experiment()
    set_id = args.report_only or args.set_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if not args.report_only:
        where = f"CIFAR-10 at {cifar}" if cifar else "the generated CIFAR-format set"
        print(f"Figure 1 (ReLU vs tanh) runs on {where}")
        queue_and_run(set_id, ablations, Plan(base, data, tuple(args.set_param)))

    from cli.paper_report import write_report

    md, html = write_report(set_id, ablations, args.out)
    print(f"paper report: {md} and {html} (open {html.resolve().as_uri()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
