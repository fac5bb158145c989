"""Which run a train stage continues: the run key and the run's state file."""

from __future__ import annotations

from pathlib import Path

from pipeline.train.runstate import STATE_NAME, RunState, run_key


def test_run_key_is_stable_and_sees_every_part() -> None:
    base = ({"lr": 0.01, "epochs": 2}, b"meta", "stats")
    assert run_key(*base) == run_key({"epochs": 2, "lr": 0.01}, b"meta", "stats")  # dict order
    assert len(run_key(*base)) == 12
    changed = [
        ({"lr": 0.02, "epochs": 2}, b"meta", "stats"),
        ({"lr": 0.01, "epochs": 2}, b"metb", "stats"),
        ({"lr": 0.01, "epochs": 2}, b"meta", "stats2"),
        ({"lr": 0.01, "epochs": 2}, b"met", "astats"),  # the boundary between parts counts
    ]
    assert len({run_key(*base), *(run_key(*c) for c in changed)}) == 1 + len(changed)


def test_state_round_trip_and_reset(tmp_path: Path) -> None:
    state = RunState(str(tmp_path / "ckpt"), "alexnet-abc")
    assert state.read() is None
    state.write({"mlflow_run_id": "r1", "complete": False})
    state.write({"mlflow_run_id": "r1", "complete": True})
    assert state.read() == {"mlflow_run_id": "r1", "complete": True}
    run_dir = tmp_path / "ckpt" / "alexnet-abc"
    assert sorted(p.name for p in run_dir.iterdir()) == [STATE_NAME]  # no temporary left
    (run_dir / "epoch-0001").mkdir()
    state.reset()
    assert not run_dir.exists() and state.read() is None


def test_state_through_a_file_uri(tmp_path: Path) -> None:
    RunState(f"file://{tmp_path}", "run").write({"complete": False})
    assert RunState(str(tmp_path), "run").read() == {"complete": False}
