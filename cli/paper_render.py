"""The paper report's two renderings of one page: Markdown (images as files beside it)
and self-contained HTML (images inline as data: URIs, CSS inline, no script, no network)."""

from __future__ import annotations

import base64
import html
from typing import Any

from cli.paper import switch_text
from pipeline.eval_report import TOP_K

NOISE = (
    "Deltas are in points of val top-1 error (switch minus baseline; positive: switching the "
    "feature off hurts, as the paper says) with a 95% interval from the val-set size "
    "(two binomial proportions over the same n images). One run per switch: seed-to-seed "
    "variation is not in the interval. 'within noise': the interval includes 0."
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _figure1_rows(fig: Any) -> list[list[str]]:
    """The Figure-1 table's rows (cli.paper_report.Figure1, or None: no rows)."""
    rows = []
    for r, epochs in () if fig is None else ((fig.relu, fig.relu_epochs), (fig.tanh, fig.tanh_epochs)):
        train = r.curves.get("train_top1_error", [])
        reached = "never" if epochs is None else str(epochs)
        rows.append([
            r.ablation.name, r.params.get("model.activation", "-"), reached,
            _pct(train[-1][1] if train else None), _pct(r.error()), str(len(train)), r.status,
        ])  # fmt: skip
    return rows


def _tables(page: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], list[str | None]]]:
    """(title, header, rows, link per row) of every table, shared by both renderings."""
    links = page["links"]
    claims = [[c.claim, c.switch, c.paper, c.ours, c.agrees, c.source] for c in page["claims"]]
    runs, run_links = [], []
    for r in page["results"]:
        epochs = max((e for e, _ in r.curves.get("val_top1_error", [])), default=0)
        status = r.status + (f": {r.reason}" if r.reason else "")
        runs.append([
            r.ablation.name, switch_text(r.ablation), status,
            _pct(r.error()), _pct(r.error("eval_top1_error_10crop")), _pct(r.error("eval_top5_error")),
            str(epochs), r.run_id or "-",
        ])  # fmt: skip
        run_links.append(links.get(r.run_id))
    pairs = [[p["true_wnid"] + " " + p["true_name"], p["pred_wnid"] + " " + p["pred_name"], p["images"]]
             for p in page["pairs"]]  # fmt: skip
    fig1_rows = _figure1_rows(page["figure1"])
    worst_first = sorted(page["per_class"], key=lambda r: -float(r["top1_error_center"]))
    per_class = [[r["wnid"], r["name"], r["images"], r["top1_error_center"], r.get("top1_error_10crop", "-")]
                 for r in worst_first]  # fmt: skip
    return [
        ("The paper's claims", ["claim", "switch", "paper Δ top-1 (points)", "ours: Δ ± 95%",
                                "sign agrees", "paper's number from"], claims, [None] * len(claims)),
        ("Runs", ["run", "switch", "status", "val top-1 (centre)", "val top-1 (10-crop)", "val top-5",
                  "epochs", "MLflow run"], runs, run_links),
        ("Figure 1: ReLU vs tanh", ["run", "activation", "epochs to 25% train error", "last train top-1",
                                    "val top-1 (centre)", "epochs", "status"], fig1_rows,
         [None] * len(fig1_rows)),
        ("Baseline: most frequent confusions", ["true class", "predicted", "val images"], pairs,
         [None] * len(pairs)),
        (f"Baseline: per-class error, worst first (at most {TOP_K} classes)",
         ["wnid", "name", "val images", "top-1 (centre)", "top-1 (10-crop)"], per_class,
         [None] * len(per_class)),
    ]  # fmt: skip


def figure1_note(page: dict[str, Any]) -> str:
    """What the Figure-1 table measured: the data, the ratio, the paper's number."""
    fig = page["figure1"]
    if fig is None:
        return "Not in this set (python -m cli.paper --only ...,fig1-relu,fig1-tanh)."
    return (
        f"Data: {fig.data}. Measured: the first epoch whose train top-1 error (over that "
        f"epoch's batches) is at most 25%; tanh/ReLU: {fig.ratio}, the paper's Figure 1: "
        "about 6x (its four-layer net on CIFAR-10). The four-layer CIFAR net "
        "(models/cifar_net.py), the same lr for both, no regularisation, no warmup."
    )


def _intro(page: dict[str, Any]) -> tuple[str, str]:
    n = len(page["results"])
    return (
        f"AlexNet: the paper's claims on this machine (set {page['set_id']})",
        f"{n} runs, one DVC experiment and one MLflow run each, in MLflow experiment "
        f"'{page['experiment']}', tagged paper_set={page['set_id']} (runs page filter: "
        f"tags.paper_set = '{page['set_id']}').",
    )


def render_markdown(page: dict[str, Any], image_paths: dict[str, str]) -> str:
    """The report as Markdown; images referenced by their relative paths."""
    title, intro = _intro(page)
    compare = f"Compare them in the MLflow UI (`make ui`): {page['links']['compare']}"
    out = [f"# {title}", "", intro, compare, ""]
    for heading, header, rows, row_links in _tables(page):
        out += [f"## {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row, link in zip(rows, row_links, strict=True):
            cells = [c.replace("|", "\\|") for c in row]
            if link:
                cells[-1] = f"[{cells[-1]}]({link})"
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if heading == "The paper's claims":
            out += [NOISE, ""]
        if heading == "Runs" and "curves" in image_paths:
            curves = f"![training curves]({image_paths['curves']})"
            out += ["## Training curves (shared axes)", "", curves, ""]
        if heading.startswith("Figure 1"):
            out += [figure1_note(page), ""]
            if "figure1" in image_paths:
                out += [f"![Figure 1: train error of ReLU and tanh]({image_paths['figure1']})", ""]
    if "per_class" in image_paths:
        out += [f"![baseline per-class error]({image_paths['per_class']})", ""]
    return "\n".join(out)


CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.note { color: #555; max-width: 60em; }
"""


def _img(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return f'<img id="img-{name}" alt="{name}" src="data:image/png;base64,{data}">'


def render_html(page: dict[str, Any], images: dict[str, bytes]) -> str:
    """The report as one HTML file: every image inline, no external reference."""
    e = html.escape
    title, intro = _intro(page)
    compare = page["links"]["compare"]
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>", f"<p>{e(intro)}</p>",
        f'<p><a href="{e(compare)}">Compare the set in the MLflow UI</a> (<code>make ui</code>).</p>',
    ]  # fmt: skip
    for heading, header, rows, row_links in _tables(page):
        out += [f"<h2>{e(heading)}</h2>", "<table><thead><tr>"]
        out += [f"<th>{e(h)}</th>" for h in header] + ["</tr></thead><tbody>"]
        for row, link in zip(rows, row_links, strict=True):
            cells = [e(c) for c in row]
            if link:
                cells[-1] = f'<a href="{e(link)}">{cells[-1]}</a>'
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        out.append("</tbody></table>")
        if heading == "The paper's claims":
            out.append(f'<p class="note">{e(NOISE)}</p>')
        if heading == "Runs" and "curves" in images:
            out += ["<h2>Training curves (shared axes)</h2>", _img("curves", images["curves"])]
        if heading.startswith("Figure 1"):
            out.append(f'<p class="note">{e(figure1_note(page))}</p>')
            if "figure1" in images:
                out.append(_img("figure1", images["figure1"]))
    if "per_class" in images:
        out.append(_img("per_class", images["per_class"]))
    out.append("</body></html>")
    return "\n".join(out)
