"""Params fuzz: every key of every section in pipeline/config.py gets wrong types,
out-of-range values, empty strings, None, lists and mappings, and the file itself gets
broken YAML and combinations that cannot run. Each case must stop `load_params` with a
ParamsError naming the key, never another exception; a stage prints it as one line and
exits 2 before doing any work.

The cases come from the dataclass fields and their metadata, so a new key is fuzzed as
soon as it exists (and a key of a new type fails here until it gets fuzz values).
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from pipeline.config import SECTIONS, ParamsError, load_params
from tests.conftest import ROOT, stage_env, write_params

# Wrong for every type: nothing, blanks, containers where a scalar goes.
COMMON = [None, "", "   ", [], [1, 2], {}, {"a": 1}]
BY_TYPE = {
    "literal": ["no-such-choice", 1, 1.5, True],
    bool: ["yes", "true", 1, 0, 1.0],
    int: ["3", 2.5, True, math.nan],
    float: ["fast", True, math.nan, math.inf, -math.inf, 10**400],  # 10**400: beyond float
    str: [5, 1.5, True],
}


def out_of_range(meta: typing.Mapping[str, Any]) -> list[object]:
    """Values just past the field's bounds and choices."""
    values: list[object] = []
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        if lo is not None:
            values.append(lo if lo_open else lo - 1)
        if hi is not None:
            values += [hi + 1, hi * 1000]
    if "choices" in meta:
        values += [min(meta["choices"]) - 1, max(meta["choices"]) + 1]
    return values


def bad_values(cls: type, field: dataclasses.Field) -> list[object]:
    """Every value the fuzz tries for `field` of section dataclass `cls`."""
    tp = typing.get_type_hints(cls)[field.name]
    kind = "literal" if typing.get_origin(tp) is Literal else tp
    assert kind in BY_TYPE, f"{cls.__name__}.{field.name}: no fuzz values for type {tp}; add them"
    common = [v for v in COMMON if not (v == "" and field.metadata.get("empty_ok"))]  # "": not set
    return common + BY_TYPE[kind] + out_of_range(field.metadata)


KEYS = [(name, f.name) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def load_error(path: Path) -> str:
    """What load_params says about `path`: the ParamsError's text, or a description of
    what went wrong instead (another exception, or no error at all)."""
    try:
        load_params(path)
    except ParamsError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any other type is the failure being tested for
        return f"raised {type(e).__name__} instead of ParamsError: {e}"
    return "accepted"


def test_the_fuzz_covers_every_section_and_its_base_loads(tmp_path: Path) -> None:
    assert {s for s, _ in KEYS} == set(SECTIONS) and len(KEYS) > 50
    assert load_error(write_params(tmp_path)) == "accepted"  # each case breaks exactly one key


@pytest.mark.parametrize(("section", "key"), KEYS, ids=[f"{s}.{k}" for s, k in KEYS])
def test_every_bad_value_is_a_params_error_naming_the_key(tmp_path: Path, section: str, key: str) -> None:
    cls = SECTIONS[section]
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    wrong = []
    for value in bad_values(cls, field):
        message = load_error(write_params(tmp_path, {section: {key: value}}))
        if not message.startswith(f"{section}.{key}="):
            wrong.append(f"{section}.{key}={repr(value)[:40]}: {message[:300]}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train: {lr: 0.1\n",
            r"params\.yaml: not a valid YAML file: line 2, column 1: expected ',' or '}', but got "
            r"'<stream end>' \(while parsing a flow mapping\)$",
        ),
        (
            "train:\n  lr: 0.1\n  lr: 0.2\n",
            r"params\.yaml: not a valid YAML file: line 3, column 3: duplicate key 'lr'$",
        ),
        ("train: {lr: 0.1}\ntrain: {lr: 0.2}\n", r"line 2, column 1: duplicate key 'train'$"),
        ("train: {? [a, b] : 1}\n", r"not a valid YAML file: line 1, column 11: found unhashable key"),
        ("train: {lr: " + "9" * 5000 + "}\n", r"(?s)not a valid YAML file: .*integer string conversion"),
        ("- train\n- model\n", r"expected a mapping of sections, got list"),
        ("42\n", r"expected a mapping of sections, got int"),
        ("train: 5\n", r"^train: expected a mapping of keys to values, got 5"),
        ("1: {}\ntrian: {}\n", r"unknown section 1; allowed: data, sample"),
        ("train: {1: 2, lrr: 3}\n", r"^train\.1: unknown key; allowed keys: augment_threads"),
    ],
    ids=[
        "unclosed",
        "duplicate-key",
        "duplicate-section",
        "list-as-key",
        "5000-digit-int",
        "list",
        "scalar",
        "section-scalar",
        "int-section-name",
        "int-key",
    ],
)
def test_a_broken_file_is_a_params_error_with_the_place(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_bytes_that_are_not_utf8_are_a_params_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(b"train:\n  run_name: caf\xe9\n")  # Latin-1, as an old editor saves it
    with pytest.raises(ParamsError, match=r"(?s)params\.yaml: not a valid YAML file: .*utf-8"):
        load_params(path)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"data": {"format": "webdataset"}, "shard": {"format": "parquet"}},
            r"^data\.format='webdataset': expected a format the shard stage writes \(shard\.format='parq",
        ),
        ({"data": {"shards": "data/sample"}}, r"^data\.shards='data/sample': overlaps data\.sample="),
        (
            {"data": {"raw": "/datasets/in", "shards": "/datasets/in/shards"}},
            r"^data\.shards='/datasets/in/shards': overlaps data\.raw='/datasets/in'",
        ),
        (
            {"data": {"raw": "s3://b/imagenet/", "shard_store": "s3://b/imagenet"}},
            r"^data\.shard_store='s3://b/imagenet': overlaps data\.raw",
        ),
        (
            {"data": {"model": "artifacts/checkpoints/model"}},
            r"^data\.model='artifacts/checkpoints/model': overlaps data\.checkpoints",
        ),
        ({"data": {"plots": "metrics"}}, r"^data\.plots='metrics': overlaps data\.train_metrics"),
        ({"train": {"gpu_augment": True}}, r"^train\.gpu_augment=True: expected false unless"),
        ({"train": {"crop": 60}}, r"^train\.crop=60: expected >= 67 for model\.arch='paper'"),
        ({"train": {"crop": 96}}, r"^train\.crop=96: expected <= shard\.size=80"),
        ({"train": {"num_workers": 3}}, r"^train\.batch_size=16: expected a multiple of train\.num_work"),
        ({"model": {"arch": "cifar", "init": "paper"}}, r"^model\.lrn=True: expected false for model\.arch"),
    ],
    ids=[
        "format-not-written",
        "shards-on-sample",
        "shards-inside-raw",
        "shard-store-on-raw-uri",
        "model-inside-checkpoints",
        "metrics-inside-plots",
        "gpu-augment-on-cpu",
        "crop-below-network",
        "crop-above-shards",
        "batch-over-workers",
        "cifar-with-lrn",
    ],
)
def test_combinations_that_cannot_run_are_params_errors(tmp_path: Path, sections: dict, message: str) -> None:
    message_seen = load_error(write_params(tmp_path, sections))
    assert re.search(message, message_seen), message_seen


def test_every_stage_prints_the_error_and_exits_2_before_any_work(tmp_path: Path) -> None:
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    expected = "error: shard.quality=101: expected int with 1 <= value <= 100"
    procs = {}
    for stage in stages:
        ws = tmp_path / stage
        ws.mkdir()
        write_params(ws, {"shard": {"quality": 101}})
        procs[stage] = subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=ws,
            env=stage_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for stage, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"{stage}: exit {proc.returncode}\n{err[-3000:]}"
        assert err.strip().splitlines()[-1] == expected, f"{stage}:\n{err[-3000:]}"
        assert "Traceback" not in err and out == "", f"{stage}:\n{err[-3000:]}"
        assert [p.name for p in (tmp_path / stage).iterdir()] == ["params.yaml"], "work started"
