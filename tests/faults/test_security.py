"""Security faults: pickles crafted to run code when loaded (checkpoints, model weights,
CIFAR batches) are refused without running it, every torch.load in the code loads tensors
only, and `make ui`'s MLflow UI answers on loopback only."""

from __future__ import annotations

import io
import pickle
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from cli.procs import spawn, stop_processes, wait_until
from models import load_checkpoint
from pipeline.cluster import free_port
from pipeline.config import ModelParams
from pipeline.data.cifar import CIFAR_DIR, ingest_cifar10
from pipeline.train.checkpoints import STATE_FILE, load_state
from pipeline.train.model_card import WEIGHTS, ModelCard, build_network, load_model, save_model
from tests.conftest import ROOT, stage_env
from tests.faults.common import STATS
from tests.test_services import non_loopback_ipv4

CODE_DIRS = ("pipeline", "models", "stages", "cli", "benchmarks")


class Payload:
    """Unpickling this opens (so creates) `marker`: what an attacker's file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def call_arguments(text: str, start: int) -> str:
    """The text between the parenthesis at `start` and its matching close."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    raise AssertionError(f"unbalanced parentheses after offset {start}")


def test_every_torch_load_in_the_code_is_weights_only() -> None:
    calls = []
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".sh") or "__pycache__" in path.parts:
                continue
            text = path.read_text()
            assert not re.search(r"from torch(\.serialization)? import[^\n]*\bload\b", text), path
            assert "torch.serialization.load(" not in text, path
            assert not re.search(r"\bpickle\.loads?\(|allow_pickle\s*=\s*True", text), (
                f"{path}: raw unpickling"
            )
            for match in re.finditer(r"torch\.load\(", text):
                args = call_arguments(text, match.end() - 1)
                calls.append(f"{path.relative_to(ROOT)}: torch.load({' '.join(args.split())})")
    assert len(calls) >= 3, calls  # the model card, the training state, models.load_checkpoint
    unsafe = [c for c in calls if not re.search(r"\bweights_only\s*=\s*True\b", c)]
    assert not unsafe, "torch.load without weights_only=True:\n" + "\n".join(unsafe)


def write_payload(path: Path, marker: Path, zipped: bool) -> None:
    """A checkpoint-shaped file whose unpickling creates `marker`, in torch.save's zip format
    or its legacy one (torch.load reads both)."""
    torch.save({"conv.weight": Payload(marker)}, path, _use_new_zipfile_serialization=zipped)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_payload_is_live_when_unpickled_the_unsafe_way(tmp_path: Path, zipped: bool) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    write_payload(path, marker, zipped)
    torch.load(path, weights_only=False)  # what the loaders below must never do
    assert marker.exists(), "the crafted file does not run code: the refusals below would prove nothing"


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_crafted_checkpoints_are_refused_by_every_loader(tmp_path: Path, zipped: bool) -> None:
    marker = tmp_path / "pwned"
    arch = ModelParams(width=0.125, init="kaiming")

    evil = tmp_path / "evil.pt"
    write_payload(evil, marker, zipped)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(build_network(arch, 3), evil)

    model_dir = tmp_path / "model"
    card = ModelCard(arch, 3, ["a", "b", "c"], 72, STATS, 1, "run", "ray-run")
    save_model(build_network(arch, 3).state_dict(), model_dir, card)
    write_payload(model_dir / WEIGHTS, marker, zipped)
    with pytest.raises(ValueError, match=re.escape(f"{model_dir / WEIGHTS}: ") + r"[\s\S]*Weights only load"):
        load_model(model_dir)

    checkpoint = tmp_path / "epoch-0001"
    checkpoint.mkdir()
    write_payload(checkpoint / STATE_FILE, marker, zipped)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state(checkpoint)
    assert not marker.exists(), "a loader ran the payload"


def cifar_batch(data: object) -> bytes:
    """A CIFAR-10 python batch (the keys and values of the official files, pickled by numpy >= 2)."""
    return pickle.dumps({b"labels": [0], b"data": data, b"batch_label": b"b"}, protocol=4)


def test_crafted_cifar_batch_is_refused_naming_file_and_global(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / CIFAR_DIR
    folder.mkdir()
    names = [f"c{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=4))
    pixels = np.zeros((1, 3072), dtype=np.uint8)
    for name in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(cifar_batch(pixels))
    (folder / "data_batch_1").write_bytes(cifar_batch(pixels))
    assert len(ingest_cifar10(str(tmp_path)).records) == 6  # the honest batches load

    evil = cifar_batch(Payload(marker))
    (folder / "data_batch_1").write_bytes(evil)
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_1: refusing global io\.open"):
        ingest_cifar10(str(tmp_path))
    assert not marker.exists(), "the CIFAR reader ran the payload"
    pickle.load(io.BytesIO(evil))  # the same bytes through plain pickle: the payload is live
    assert marker.exists()


def make_ui_command(store: Path, port: int) -> list[str]:
    """The Makefile's `ui` recipe, with its store in `store` and its port `port`."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^ui:.*\n\t(.+)$", makefile, re.MULTILINE).group(1)
    recipe = recipe.replace("$(CURDIR)/mlflow.db", str(store)).replace("--port 5000", f"--port {port}")
    assert "$(" not in recipe and f"--port {port}" in recipe, recipe
    argv = recipe.split()
    assert argv[0] == "mlflow", recipe
    return [str(Path(sys.executable).parent / "mlflow"), *argv[1:]]


def test_make_ui_answers_on_loopback_only(tmp_path: Path) -> None:
    addresses = non_loopback_ipv4()
    assert addresses, "this test needs a non-loopback IPv4 address"
    port = free_port("127.0.0.1")
    env = stage_env() | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc, record = spawn("mlflow-ui", make_ui_command(tmp_path / "mlflow.db", port), tmp_path / "ui.log", env)

    def answers() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_until(answers, proc, record, timeout_s=180)
        for address in addresses:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()
    finally:
        stop_processes([record])
