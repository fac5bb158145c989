"""params.yaml validation: every kind of mistake fails at load time, naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import SECTIONS, ParamsError, load_params, parse_section

ROOT = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, **sections: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def test_repo_params_load_into_frozen_dataclasses() -> None:
    params = load_params(ROOT / "params.yaml")
    assert [f.name for f in dataclasses.fields(params)] == list(SECTIONS)
    assert params.train.momentum == 0.9
    with pytest.raises(AttributeError):
        params.train.lr = 1.0  # frozen
    assert params.flat()["train.lr"] == params.train.lr


def test_defaults_are_the_papers_recipe() -> None:
    train = parse_section("train", {}, SECTIONS["train"])
    assert (train.batch_size, train.lr, train.momentum, train.weight_decay) == (128, 0.01, 0.9, 0.0005)
    assert (train.crop, train.pca_std, train.schedule, train.max_reductions) == (227, 0.1, "plateau", 3)
    model = parse_section("model", {}, SECTIONS["model"])
    assert (model.lrn, model.groups, model.pooling, model.dropout, model.width) == (
        True,
        2,
        "overlap",
        0.5,
        1.0,
    )
    shard = parse_section("shard", {}, SECTIONS["shard"])
    assert (shard.size, shard.quality, shard.max_bad_fraction) == (256, 90, 0.001)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"lrr": 0.1}}, r"train\.lrr: unknown key; allowed keys: .*\blr\b"),
        ({"train": {"lr": "fast"}}, r"train\.lr='fast': expected float"),
        ({"train": {"epochs": 2.5}}, r"train\.epochs=2\.5: expected int"),
        ({"train": {"epochs": True}}, r"train\.epochs=True: expected int"),
        ({"train": {"use_gpu": "yes"}}, r"train\.use_gpu='yes': expected bool"),
        ({"train": {"lr": 0}}, r"train\.lr=0\.0: expected float with 0\.0 < value <= 10\.0"),
        ({"train": {"momentum": 1.5}}, r"train\.momentum=1\.5: expected float with 0\.0 <= value <= 0\.999"),
        ({"train": {"schedule": "cosine"}}, r"train\.schedule='cosine': expected one of 'plateau', 'step'"),
        ({"model": {"groups": 3}}, r"model\.groups=3: expected one of 1, 2"),
        ({"model": {"activation": "gelu"}}, r"model\.activation='gelu': expected one of 'relu', 'tanh'"),
        ({"shard": {"quality": 101}}, r"shard\.quality=101: expected int with 1 <= value <= 100"),
        ({"sample": {"num_classes": 1}}, r"sample\.num_classes=1: expected int with 2 <= value <= 1000"),
        ({"data": {"format": "csv"}}, r"data\.format='csv': expected one of 'parquet', 'webdataset'"),
        ({"data": {"raw": ""}}, r"data\.raw='': expected str"),
        ({"data": {"model": "s3://b/model"}}, r"data\.model='s3://b/model': expected a local path"),
        ({"train": [1, 2]}, r"train: expected a mapping"),
        ({"trian": {"lr": 0.1}}, r"unknown section 'trian'"),
    ],
)
def test_bad_params_name_key_value_and_allowed(tmp_path: Path, sections: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path, **sections))


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_stage_rejects_bad_params_before_any_work(tmp_path: Path) -> None:
    write_params(tmp_path, train={"batch_size": -4})
    out = subprocess.run(
        [sys.executable, "-m", "stages.train"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "train.batch_size=-4: expected int with 1 <= value" in out.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"arch": "torchvision"}, r"model\.lrn=True: expected false for model\.arch='torchvision'"),
        ({"arch": "cifar", "lrn": False}, r"model\.groups=2: expected 1 for model\.arch='cifar'"),
        (
            {"arch": "torchvision", "lrn": False, "groups": 1, "pooling": "nonoverlap"},
            r"model\.pooling='nonoverlap': expected 'overlap'",
        ),
    ],
)
def test_invalid_model_combinations(tmp_path: Path, model: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path, model=model))


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"crop": 56}}, r"train\.crop=56: expected >= 67 for model\.arch='paper' with model\.pool"),
        ({"train": {"crop": 38}, "model": {"pooling": "nonoverlap"}}, r"train\.crop=38: expected >= 39"),
        ({"train": {"crop": 112}, "shard": {"size": 100}}, r"train\.crop=112: expected <= shard\.size=100"),
        ({"train": {"batch_size": 63, "num_workers": 2}}, r"train\.batch_size=63: expected a multiple of"),
    ],
)
def test_combinations_that_cannot_run_fail_at_load(tmp_path: Path, sections: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path, **sections))


def test_imagenet_profile_is_the_papers_recipe() -> None:
    params = load_params(ROOT / "params-imagenet.yaml")
    train, model, shard = params.train, params.model, params.shard
    assert (model.width, model.init, model.lrn, model.groups, model.dropout) == (1.0, "paper", True, 2, 0.5)
    assert (train.crop, train.batch_size, train.lr, train.epochs, train.schedule) == (
        227,
        128,
        0.01,
        90,
        "plateau",
    )
    assert (train.momentum, train.weight_decay, train.max_reductions) == (0.9, 0.0005, 3)
    assert shard.size == 256
    # The same keys as params.yaml, so `cp params-imagenet.yaml params.yaml` keeps dvc.yaml valid.
    keys = [
        {k: set(v) for k, v in yaml.safe_load((ROOT / f).read_text()).items()}
        for f in ("params-imagenet.yaml", "params.yaml")
    ]
    assert keys[0] == keys[1]
