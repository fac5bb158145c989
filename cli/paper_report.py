"""The paper report of one set of ablation runs (cli.paper): gathered from MLflow, written
as `paper.md` (images beside it) and a self-contained `paper.html` (images inline).

Noise: every error is measured on the same n val images, so a delta's 95% interval is
1.96 x sqrt(p0 (1 - p0) / n + p1 (1 - p1) / n) (two binomial proportions; it ignores the
pairing, so it is conservative), plus nothing for seed-to-seed variation, which one run
per switch cannot measure.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from cli.paper import EXPERIMENT, FIGURE1_SOURCE, Ablation, exp_name, is_figure1
from cli.paper_render import render_html, render_markdown
from pipeline.eval_report import TOP_K
from pipeline.storage import atomic_write_bytes

UI = "http://127.0.0.1:5000"  # `make ui`
CURVES = ("train_loss", "train_top1_error", "val_top1_error")
TANH_TARGET = 0.25  # the paper's Figure 1 threshold: epochs to 25% train error
PAPER_SPEEDUP = 6.0  # Figure 1: ReLU reaches it six times faster than tanh


@dataclass(frozen=True)
class RunResult:
    """One run of the set as MLflow holds it.

    Attributes:
        ablation: Its Ablation.
        run_id: MLflow run id ("" when the experiment left no run).
        status: finished | diverged | failed | missing.
        reason: Why not finished (the divergence reason, the run's status).
        metrics: Its final MLflow metrics (eval_top1_error, ...).
        curves: Metric name -> [(epoch, value)] for CURVES.
        params: Its MLflow params (`section.key` -> value as logged).
    """

    ablation: Ablation
    run_id: str
    status: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def error(self, key: str = "eval_top1_error") -> float | None:
        """A final error of a finished run, else None."""
        return self.metrics.get(key) if self.status == "finished" else None


@dataclass(frozen=True)
class Claim:
    """One row of the claims table: the paper's delta against ours."""

    claim: str
    switch: str
    paper: str
    ours: str
    agrees: str
    source: str


def delta_ci(p0: float, p1: float, n: int) -> tuple[float, float]:
    """(p1 - p0, its 95% half-width), in points, for two error rates over the same n images."""
    half = 1.96 * math.sqrt(p0 * (1 - p0) / n + p1 * (1 - p1) / n)
    return 100 * (p1 - p0), 100 * half


def epochs_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first epoch whose value is <= target, or None."""
    return next((e for e, v in curve if v <= target), None)


def collect(set_id: str, ablations: list[Ablation]) -> tuple[str, list[RunResult]]:
    """Finds each ablation's newest MLflow run, tags it `paper_set=<set_id>`, reads it.

    Returns:
        (experiment id, one RunResult per ablation, in order).
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"error: MLflow experiment {EXPERIMENT!r} does not exist: run `make paper` first")
    results = []
    for a in ablations:
        name = exp_name(set_id, a.name)
        runs = client.search_runs(
            [experiment.experiment_id], f"tags.dvc_exp_name = '{name}'", max_results=1,
            order_by=["attributes.start_time DESC"],
        )  # fmt: skip
        if not runs:
            results.append(RunResult(a, "", "missing", f"no MLflow run tagged dvc_exp_name={name}"))
            continue
        run = runs[0]
        client.set_tag(run.info.run_id, "paper_set", set_id)
        client.set_tag(run.info.run_id, "paper_ablation", a.name)
        tags, metrics = run.data.tags, dict(run.data.metrics)
        curves = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in CURVES
        }
        if tags.get("diverged") == "true":
            status, reason = "diverged", tags.get("diverged_reason", "")
        elif "eval_top1_error" in metrics:
            status, reason = "finished", ""
        else:
            status, reason = "failed", f"MLflow status {run.info.status}, no evaluation"
        results.append(RunResult(a, run.info.run_id, status, reason, metrics, curves, dict(run.data.params)))
    return experiment.experiment_id, results


def claims(results: list[RunResult]) -> list[Claim]:
    """The claims table: each switch against the baseline, 10-crop against centre, and
    the Figure-1 speed-up of ReLU over tanh."""
    rows: list[Claim] = []
    ablations = [r for r in results if not is_figure1(r.ablation)]
    if not ablations:
        return _figure1_claim(results)
    base = ablations[0]
    p0, n = base.error(), int(base.metrics.get("eval_num_images", 0))
    for r in ablations[1:]:
        a, p1 = r.ablation, r.error()
        paper = "n/a" if a.paper_delta is None else f"+{a.paper_delta:.1f}"
        if p0 is None or p1 is None:
            ours, agrees = f"run {r.status}: {r.reason or 'no baseline'}", "n/a"
        else:
            d, half = delta_ci(p0, p1, n)
            ours = f"{p1:.2%} vs {p0:.2%}: {d:+.1f} ± {half:.1f}"
            agrees = ("yes" if d > 0 else "no") + (" (within noise)" if abs(d) <= half else "")
        if a.name == "tanh":
            ours += _speed(base, r)
        rows.append(Claim(a.claim, " ".join(a.overrides), paper, ours, agrees, a.paper_source))
    ten = base.error("eval_top1_error_10crop")
    if p0 is not None and ten is not None:
        d, half = delta_ci(ten, p0, n)
        agrees = ("yes" if d > 0 else "no") + (" (within noise)" if abs(d) <= half else "")
        rows.append(Claim(
            "10-crop testing beats one centre crop", "evaluate.ten_crop (baseline model)", "n/a",
            f"{p0:.2%} vs {ten:.2%}: {d:+.1f} ± {half:.1f}", agrees,
            "paper section 6: averaging ten patches' softmax (no single-crop number)",
        ))  # fmt: skip
    return rows + _figure1_claim(results)


@dataclass(frozen=True)
class Figure1:
    """The ReLU-vs-tanh pair: which data, epochs to TANH_TARGET, and their ratio."""

    relu: RunResult
    tanh: RunResult
    data: str
    relu_epochs: int | None
    tanh_epochs: int | None
    ratio: str


def figure1(results: list[RunResult]) -> Figure1 | None:
    """The Figure-1 pair of a set, None when the set has none."""
    pair = {r.ablation.name: r for r in results if is_figure1(r.ablation)}
    if len(pair) != 2:
        return None
    relu, tanh = pair["fig1-relu"], pair["fig1-tanh"]
    a, b = (epochs_to(r.curves.get("train_top1_error", []), TANH_TARGET) for r in (relu, tanh))
    ran = max((e for e, _ in tanh.curves.get("train_top1_error", [])), default=0)
    if a is None:
        ratio = "n/a (ReLU never reached it)"
    elif b is None:
        ratio = f"> {ran / a:.1f}x (tanh never reached it in {ran} epochs)"
    else:
        ratio = f"{b / a:.1f}x"
    return Figure1(relu, tanh, figure1_data(relu.params), a, b, ratio)


def figure1_data(params: dict[str, str]) -> str:
    """Which data a Figure-1 run read, from its logged params."""
    p = params.get
    if not params:
        return "unknown (the run logged no params)"
    if p("sample.layout") == "cifar10" and p("data.raw") == p("data.sample"):
        return (
            f"a CIFAR-format set generated by the sample stage (sample.layout: cifar10, no CIFAR-10 "
            f"here): {p('sample.num_classes')} classes of drawn objects over clutter, "
            f"{p('sample.train_per_class')} train and {p('sample.val_per_class')} val images per class, 32 px"
        )
    return f"CIFAR-10 ({p('data.raw')})"


def _figure1_claim(results: list[RunResult]) -> list[Claim]:
    fig = figure1(results)
    if fig is None:
        return []
    fmt = {None: "never"}
    ours = (
        f"epochs to {TANH_TARGET:.0%} train error: ReLU {fmt.get(fig.relu_epochs, fig.relu_epochs)}, "
        f"tanh {fmt.get(fig.tanh_epochs, fig.tanh_epochs)}; tanh/ReLU {fig.ratio}"
    )
    if fig.relu_epochs is None:
        agrees = "n/a"
    else:
        agrees = "yes" if fig.tanh_epochs is None or fig.tanh_epochs > fig.relu_epochs else "no"
    return [Claim(
        "ReLU trains faster than tanh (Figure 1)", "model.activation (CIFAR net)", f"{PAPER_SPEEDUP:.0f}x",
        ours, agrees, FIGURE1_SOURCE,
    )]  # fmt: skip


def _speed(relu: RunResult, tanh: RunResult) -> str:
    """Epochs each needed to reach TANH_TARGET train top-1 error (the Figure 1 measure)."""
    a, b = (epochs_to(r.curves.get("train_top1_error", []), TANH_TARGET) for r in (relu, tanh))
    fmt = {None: "never"}
    return f"; epochs to {TANH_TARGET:.0%} train error: ReLU {fmt.get(a, a)}, tanh {fmt.get(b, b)}"


def _read_csv(run_id: str, artifact: str) -> list[dict[str, str]]:
    """An evaluation CSV the run logged ([] when it has none)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            return []
        with open(path) as f:
            return list(csv.DictReader(f))


def links(experiment_id: str, results: list[RunResult]) -> dict[str, str]:
    """MLflow UI links: each run, and the compare view of the whole set."""
    ids = [r.run_id for r in results if r.run_id]
    out = {r.run_id: f"{UI}/#/experiments/{experiment_id}/runs/{r.run_id}" for r in results if r.run_id}
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment_id])})
    out["compare"] = f"{UI}/#/compare-runs?{query}"
    return out


def write_report(set_id: str, ablations: list[Ablation], out: Path) -> tuple[Path, Path]:
    """Gathers the set from MLflow and writes out/paper.md (+ out/paper_files/) and out/paper.html.

    Returns:
        The two paths.
    """
    from cli.paper_figures import curves_png, figure1_png, per_class_png

    experiment_id, results = collect(set_id, ablations)
    ablation_runs = [r for r in results if not is_figure1(r.ablation)]
    base_id = ablation_runs[0].run_id if ablation_runs else ""
    per_class = _read_csv(base_id, "evaluation/per_class_error.csv") if base_id else []
    # The worst TOP_K classes: a table and a chart of 1,000 rows read as nothing.
    per_class = sorted(per_class, key=lambda r: (-float(r["top1_error_center"]), int(r["label"])))[:TOP_K]
    confusion = _read_csv(base_id, "evaluation/confusion.csv") if base_id else []
    pairs = [c for c in confusion if c["true_label"] != c["pred_label"]][:10]
    fig1 = figure1(results)
    images = {}
    if ablation_runs:
        images["curves"] = curves_png(ablation_runs, CURVES)
    if fig1 is not None:
        images["figure1"] = figure1_png(fig1.relu, fig1.tanh, TANH_TARGET)
    if per_class:
        images["per_class"] = per_class_png(per_class)
    files = out / "paper_files"
    for name, png in images.items():
        atomic_write_bytes(files / f"{name}.png", png)
    page = {
        "set_id": set_id, "experiment": EXPERIMENT, "results": results, "claims": claims(results),
        "pairs": pairs, "per_class": per_class, "links": links(experiment_id, results), "figure1": fig1,
    }  # fmt: skip
    md, html = out / "paper.md", out / "paper.html"
    atomic_write_bytes(md, render_markdown(page, {k: f"paper_files/{k}.png" for k in images}).encode())
    atomic_write_bytes(html, render_html(page, images).encode())
    return md, html
