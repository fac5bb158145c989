"""`python -m cli.paper` on tiny runs: a baseline and one switch queued and run as DVC
experiments, their MLflow runs tagged as one set in their own experiment, and the report
opened in headless Chromium (Debian's `chromium`, installed by `make system-deps`): a
screenshot to a file, every table and every image rendered."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from tests.conftest import git_project, stage_env

SET = "t1"
PROBE = """<script>window.addEventListener("load", () => {
  const pre = document.createElement("pre"); pre.id = "probe";
  pre.textContent = JSON.stringify({
    tables: [...document.querySelectorAll("table")].map(t => t.querySelectorAll("tbody tr").length),
    images: [...document.images].map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0),
  });
  document.body.appendChild(pre);
});</script>"""


def chromium(*args: str, user_dir: Path) -> str:
    """Runs headless Chromium (as root it needs --no-sandbox) and returns its stdout."""
    cmd = [
        shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--no-first-run", "--disable-background-networking", f"--user-data-dir={user_dir}", *args,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def paper_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after `python -m cli.paper --only baseline,no-lrn`."""
    ws = git_project(tmp_path_factory.mktemp("paper"))
    out = subprocess.run(
        [sys.executable, "-m", "cli.paper", "--only", "baseline,no-lrn", "--set", SET],
        cwd=ws, env=stage_env(), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "paper report: reports/paper.md" in out.stdout
    return ws


def test_each_experiment_is_one_tagged_mlflow_run(paper_set: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{paper_set / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["alexnet-paper"], filter_string=f"tags.paper_set = '{SET}'", output_format="list"
    )
    names = {r.data.tags["dvc_exp_name"]: r for r in runs}
    assert set(names) == {f"paper-{SET}-baseline", f"paper-{SET}-no-lrn"}
    assert names[f"paper-{SET}-no-lrn"].data.params["model.lrn"] == "False"
    assert names[f"paper-{SET}-baseline"].data.params["model.lrn"] == "True"
    assert all("eval_top1_error" in r.data.metrics for r in runs)
    client = mlflow.MlflowClient()
    # Ablations register under their own name: the main model's candidate is untouched.
    assert {m.name for m in client.search_registered_models()} == {"alexnet-paper"}
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=paper_set, env=stage_env(), capture_output=True, text=True
    ).stdout
    assert f"paper-{SET}-baseline" in shown and f"paper-{SET}-no-lrn" in shown
    # Isolated: the workspace's params are untouched by the queued experiments' -S.
    assert subprocess.run(["git", "diff", "--quiet", "params.yaml"], cwd=paper_set).returncode == 0


def test_report_renders_in_headless_chromium(paper_set: Path, tmp_path: Path) -> None:
    md = (paper_set / "reports/paper.md").read_text()
    claim = r"\| local response normalisation lowers top-1 error \| model.lrn=false \| \+1\.4 \|"
    assert re.search(claim, md)
    assert "(paper_files/curves.png)" in md and (paper_set / "reports/paper_files/curves.png").is_file()
    page = (paper_set / "reports/paper.html").read_text()
    # Self-contained: every image inline, nothing fetched from anywhere.
    assert not re.search(r"""(src|href)=["'](?!data:|http://127\.0\.0\.1:5000/)""", page)
    sources = re.findall(r'<img [^>]*src="([^"]{0,30})', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)

    shot = tmp_path / "paper.png"
    chromium("--hide-scrollbars", "--window-size=1400,2200", f"--screenshot={shot}",
             (paper_set / "reports/paper.html").as_uri(), user_dir=tmp_path / "chrome")  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2200, 1400) and pixels.std() > 10, "the screenshot is blank"

    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), user_dir=tmp_path / "chrome")
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom).group(1))
    claims, runs, pairs, per_class = found["tables"]
    assert claims == 2  # no-LRN, and 10-crop vs centre of the baseline
    assert runs == 2 and per_class == 3 and pairs >= 0
    assert found["images"] == [True, True], "an image did not render"
