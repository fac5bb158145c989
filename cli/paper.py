"""`make paper`: the paper's ablations as DVC experiments, then a report on them.

Queues one DVC experiment per switch plus the baseline (`dvc exp run --queue`, each one
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
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking

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
BY_NAME = {a.name: a for a in ABLATIONS}


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


def queue_and_run(set_id: str, ablations: list[Ablation], extra: list[str]) -> None:
    """Queues one DVC experiment per ablation, then runs the queue (serially: 2 cores)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    _dvc("repro", "stats", env=env)  # shared inputs cached once, not rebuilt per experiment
    common = [f"mlflow.experiment={EXPERIMENT}", f"mlflow.registered_model={REGISTERED_MODEL}", *extra]
    for a in ablations:
        sets = [arg for value in (*common, *a.overrides) for arg in ("-S", value)]
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
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"--only {unknown[0]!r}: expected one of {', '.join(BY_NAME)}")
    if "baseline" not in names:
        parser.error("--only: the set needs its baseline (every delta is against it)")
    ablations = [BY_NAME[n] for n in names]
    prepare_experiment()
    set_id = args.report_only or args.set_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if not args.report_only:
        queue_and_run(set_id, ablations, args.set_param)

    from cli.paper_report import write_report

    md, html = write_report(set_id, ablations, args.out)
    print(f"paper report: {md} and {html} (open {html.resolve().as_uri()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
