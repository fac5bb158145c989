"""`python -m cli.paper` on tiny runs: a baseline and the Figure-1 pair (the CIFAR net with
ReLU and with tanh, on the generated CIFAR-format set) queued and run as DVC experiments,
their MLflow runs tagged as one set in their own experiment, and the report opened in
headless Chromium (Debian's `chromium`, installed by `make system-deps`): a screenshot to
a file, every table and every image rendered. The claims table's ablation rows are checked
on made-up runs (no training)."""

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
def paper_set(tiny_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after `python -m cli.paper --only baseline,fig1-relu,fig1-tanh`; the
    -S values are the tiny profile's own, so they shrink only the Figure-1 runs.

    The baseline's inputs are the session's tiny ones (same params), committed to DVC
    (`dvc commit`), so the set's `dvc repro stats` finds them up to date instead of running
    three more stages."""
    ws = git_project(tmp_path_factory.mktemp("paper"))
    for rel in ("data", "metrics"):  # the sample, shard and stats outputs
        shutil.copytree(tiny_inputs / rel, ws / rel)
    commit = ["dvc", "commit", "--force", "--with-deps", "stats"]
    out = subprocess.run(commit, cwd=ws, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tiny = ["-S", "sample.train_per_class=16", "-S", "sample.val_per_class=4", "-S", "train.epochs=2"]
    out = subprocess.run(
        [sys.executable, "-m", "cli.paper", "--only", "baseline,fig1-relu,fig1-tanh", "--set", SET, *tiny],
        cwd=ws, env=stage_env(), capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "paper report: reports/paper.md" in out.stdout
    assert "Figure 1 (ReLU vs tanh) runs on the generated CIFAR-format set" in out.stdout
    return ws


# Three experiments and their inputs start Ray ten times: past the suite's 900 s on a busy machine.
SET_TIMEOUT = pytest.mark.timeout(1800)


@SET_TIMEOUT
def test_each_experiment_is_one_tagged_mlflow_run(paper_set: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{paper_set / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["alexnet-paper"], filter_string=f"tags.paper_set = '{SET}'", output_format="list"
    )
    names = {r.data.tags["dvc_exp_name"]: r for r in runs}
    assert set(names) == {f"paper-{SET}-{n}" for n in ("baseline", "fig1-relu", "fig1-tanh")}
    base, relu, tanh = (names[f"paper-{SET}-{n}"].data.params for n in ("baseline", "fig1-relu", "fig1-tanh"))
    assert (base["model.arch"], base["shard.source"], base["sample.layout"]) == ("paper", "imagenet", "tree")
    for fig1, activation in ((relu, "relu"), (tanh, "tanh")):
        assert fig1["model.activation"] == activation and fig1["model.arch"] == "cifar"
        assert (fig1["shard.source"], fig1["sample.layout"]) == ("cifar10", "cifar10")
        assert fig1["shard.size"] == fig1["train.crop"] == "32"
        assert fig1["train.epochs"] == "2" and fig1["sample.train_per_class"] == "16"  # -S comes last
    assert all("eval_top1_error" in r.data.metrics for r in runs)
    client = mlflow.MlflowClient()
    # Ablations register under their own name: the main model's candidate is untouched.
    assert {m.name for m in client.search_registered_models()} == {"alexnet-paper"}
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=paper_set, env=stage_env(), capture_output=True, text=True
    ).stdout
    assert f"paper-{SET}-baseline" in shown and f"paper-{SET}-fig1-tanh" in shown
    # Isolated: the workspace's params are untouched by the queued experiments' -S.
    assert subprocess.run(["git", "diff", "--quiet", "params.yaml"], cwd=paper_set).returncode == 0


@SET_TIMEOUT
def test_report_renders_in_headless_chromium(paper_set: Path, tmp_path: Path) -> None:
    md = (paper_set / "reports/paper.md").read_text()
    claim = r"\| ReLU trains faster than tanh \(Figure 1\) \| model.activation \(CIFAR net\) \| 6x \| "
    assert re.search(claim, md), md
    assert "Data: a CIFAR-format set generated by the sample stage" in md
    assert "3 classes of drawn objects over clutter, 16 train and 4 val images per class, 32 px" in md
    for image in ("curves", "figure1", "per_class"):
        assert f"(paper_files/{image}.png)" in md
        assert (paper_set / f"reports/paper_files/{image}.png").is_file()
    page = (paper_set / "reports/paper.html").read_text()
    # Self-contained: every image inline, nothing fetched from anywhere.
    assert not re.search(r"""(src|href)=["'](?!data:|http://127\.0\.0\.1:5000/)""", page)
    sources = re.findall(r'<img [^>]*src="([^"]{0,30})', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)

    shot = tmp_path / "paper.png"
    chromium("--hide-scrollbars", "--window-size=1400,2200", f"--screenshot={shot}",
             (paper_set / "reports/paper.html").as_uri(), user_dir=tmp_path / "chrome")  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2200, 1400) and pixels.std() > 10, "the screenshot is blank"

    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), user_dir=tmp_path / "chrome")
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom).group(1))
    claims, runs, figure1, pairs, per_class = found["tables"]
    assert claims == 2  # 10-crop vs centre of the baseline, and Figure 1's ReLU vs tanh
    assert runs == 3 and figure1 == 2 and per_class == 3 and pairs >= 0
    assert found["images"] == [True, True, True], "an image did not render"


def test_claims_on_made_up_runs() -> None:
    """The claims table from runs made up here: a switch's delta with its interval and sign,
    a diverged run reported as such, and Figure 1's epochs to 25% and their ratio."""
    from cli.paper import BY_NAME
    from cli.paper_report import RunResult, claims, figure1

    def run(name: str, top1: float | None, train: list[float] = (), status: str = "finished") -> RunResult:
        metrics = {"eval_num_images": 500.0, "eval_top1_error_10crop": 0.08}
        metrics |= {} if top1 is None else {"eval_top1_error": top1}
        curve = [(epoch, error) for epoch, error in enumerate(train, start=1)]
        params = {"sample.layout": "tree", "data.raw": "/cifar-10-batches-py", "data.sample": "data/sample"}
        reason = "loss at chance" if status == "diverged" else ""
        return RunResult(BY_NAME[name], name, status, reason, metrics, {"train_top1_error": curve}, params)

    base, no_lrn = run("baseline", 0.10), run("no-lrn", 0.15)
    dead = run("nonoverlap", None, status="diverged")
    relu = run("fig1-relu", 0.3, [0.8, 0.5, 0.2])
    tanh = run("fig1-tanh", 0.4, [0.9, 0.7, 0.5, 0.3, 0.3, 0.25, 0.2])
    rows = {c.switch: c for c in claims([base, no_lrn, dead, relu, tanh])}
    assert (rows["model.lrn=false"].paper, rows["model.lrn=false"].agrees) == ("+1.4", "yes")
    # 1.96 sqrt(0.1 x 0.9 / 500 + 0.15 x 0.85 / 500) = 4.1 points
    assert rows["model.lrn=false"].ours == "15.00% vs 10.00%: +5.0 ± 4.1"
    assert rows["model.pooling=nonoverlap"].ours == "run diverged: loss at chance"
    assert rows["evaluate.ten_crop (baseline model)"].agrees == "yes (within noise)"  # 2.0 ± 3.5
    fig1 = rows["model.activation (CIFAR net)"]
    assert fig1.ours == "epochs to 25% train error: ReLU 3, tanh 6; tanh/ReLU 2.0x" and fig1.agrees == "yes"
    assert figure1([relu, tanh]).data == "CIFAR-10 (/cifar-10-batches-py)"
    never = run("fig1-tanh", 0.6, [0.9, 0.8, 0.7, 0.6])
    assert figure1([relu, never]).ratio == "> 1.3x (tanh never reached it in 4 epochs)"


def test_params_file_becomes_overrides_dvc_applies(tmp_path: Path) -> None:
    """`cli.paper --params params-imagenet.yaml`: the file's differences from params.yaml as
    -S values which DVC's own override parser turns back into that file's params."""
    from dvc.utils.hydra import apply_overrides

    from cli.paper import params_overrides
    from pipeline.config import load_params
    from tests.conftest import ROOT

    overrides = params_overrides(ROOT / "params-imagenet.yaml", ROOT / "params.yaml")
    assert 'data.raw="/datasets/ILSVRC2012"' in overrides and "train.use_gpu=true" in overrides
    assert not any(o.startswith("train.momentum=") for o in overrides)  # equal in both files
    copy = tmp_path / "params.yaml"
    copy.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(copy, list(overrides))
    assert load_params(copy) == load_params(ROOT / "params-imagenet.yaml")

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.0\n")
    with pytest.raises(SystemExit, match=r"^error: --params .*bad\.yaml: train\.lr=0\.0: expected float"):
        params_overrides(bad, ROOT / "params.yaml")
