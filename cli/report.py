"""Prints the results of the last `dvc repro`: val errors, where the model is, the MLflow UI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.config import load_params


def report() -> str:
    """The results table as text."""
    data = load_params().data
    ev = json.loads(Path(data.eval_metrics).read_text())
    tr = json.loads(Path(data.train_metrics).read_text())
    rows = [
        ("val top-1 error (centre crop)", f"{ev['top1_error']:.2%}"),
        ("val top-5 error (centre crop)", f"{ev['top5_error']:.2%}"),
    ]
    if "top1_error_10crop" in ev:
        rows += [
            ("val top-1 error (10-crop)", f"{ev['top1_error_10crop']:.2%}"),
            ("val top-5 error (10-crop)", f"{ev['top5_error_10crop']:.2%}"),
        ]
    rows += _worst(Path(data.plots))
    rows += [
        ("val images", str(ev["num_images"])),
        ("epochs trained", str(tr["epochs_run"])),
        ("train images/s", f"{tr['images_per_s']:.0f}"),
        ("model", f"{data.model}/ (registered as version {ev['model_version']})"),
        ("MLflow run", tr["mlflow_run_id"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("\nOpen the MLflow UI with `make ui`, then http://127.0.0.1:5000")
    return "\n".join(lines)


def _worst(plots: Path) -> list[tuple[str, str]]:
    """The worst class and the most-confused pair (the first rows of the evaluate stage's
    bounded tables), so the table says the same at 10 classes and at 1,000."""
    rows = []
    with (plots / "worst_classes.csv").open() as f:
        worst = next(csv.DictReader(f), None)
    if worst is not None:
        rows.append(
            (
                f"worst class ({worst['crop']})",
                f"{worst['class']}: top-1 error {float(worst['top1_error']):.2%}",
            )
        )
    with (plots / "confused_pairs.csv").open() as f:
        pair = next(csv.DictReader(f), None)
    if pair is not None:
        rows.append(("most confused", f"{pair['pair']}: {pair['images']} val images"))
    return rows


if __name__ == "__main__":
    print(report())
