"""Shared fixtures: one real local Ray instance for the whole test session; the shared
services (S3 server, PostgreSQL, mlflow server) and a multi-node Ray cluster in network
namespaces, per module."""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cli.localcluster import running
from cli.postgres import PostgresServer, start_postgres
from cli.raynodes import Cluster
from cli.services import S3Server, ServicesInfo, remove_all, start_s3, start_services, stop_services
from pipeline.cluster import start_local_ray

# Test files that start clusters in network namespaces. `make test` runs two files at a
# time (pytest-xdist, --dist loadfile): these take a machine-wide lock for the whole module,
# so their clusters, and their tests' view of the machine's namespaces, never overlap.
NAMESPACE_FILES = {"test_localcluster.py", "test_cluster_pipeline.py", "test_ray_head_restart.py"}
NAMESPACE_LOCK = Path(tempfile.gettempdir()) / "alexnet-namespace-tests.lock"


@pytest.fixture(scope="module", autouse=True)
def one_namespace_module_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Holds NAMESPACE_LOCK while a NAMESPACE_FILES module runs (autouse: before its
    cluster fixtures start anything); other modules run without it."""
    if request.path.name not in NAMESPACE_FILES:
        yield
        return
    with NAMESPACE_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


# A train stage's environment that paces its epochs at about 1 s: Ray Train's controller
# polls the workers every 1 s instead of the stage's 0.2 s, and each report waits for a poll.
# Only the report cadence changes; for tests whose fault must land before training ends.
PACED_EPOCHS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}


# The longest files first, so that the two workers end together instead of one running the
# last long file alone; the namespace-cluster file among them goes first, long before the
# other two reach the lock. Every other file, and the tests inside each file, keep their order.
LONG_FILES = (
    "test_cluster_pipeline.py", "test_paper.py", "test_training.py", "test_s3_training.py",
    "test_pipeline_dvc.py", "test_cluster.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Puts LONG_FILES' tests first (a stable sort: the order within each file stays)."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """Starts a real local Ray instance (2 CPUs) shared by the session, with the State API
    that tests running Ray Train in this process need."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # A fresh instance, never a cluster someone started with `ray start` (RAY_ADDRESS ignored).
    start_local_ray(num_cpus=2, quiet=True, state_api=True)
    yield
    ray.shutdown()


ROOT = Path(__file__).resolve().parents[1]

# Console noise that no stage may print: Ray's and MLflow's internal chatter, and the
# requires_grad warning of converting a loss that was not detached (our own cause).
NOISE = (
    "TrainingReport(",
    "Reporting training result",
    "Checkpoint successfully created",
    "Starting execution of Dataset",
    "Execution plan of Dataset",
    "Progress bars disabled",
    "The specified dataset source can be interpreted in multiple ways",
    "requires_grad",
    "Token authentication is enabled for this Ray cluster",
    "PreemptionWatcher",
    "PlacementGroupCleaner",
    "Failed to query Ray Train Controller actor state",
    "Found multiple active Ray instances",
    "Started monitoring system metrics",
)

# A tiny but complete profile: 3 classes, 72-px crops of 80-px shards, a width-1/8 paper
# AlexNet (72 px is above the 67-px minimum of its conv/pool stack).
TINY_PARAMS = {
    "sample": {"num_classes": 3, "train_per_class": 16, "val_per_class": 4, "seed": 0},
    "shard": {"size": 80, "shard_size": 16, "format": "both"},
    "model": {"width": 0.125, "init": "kaiming"},
    "train": {"epochs": 2, "batch_size": 16, "crop": 72, "patience": 1, "max_failures": 1},
    "evaluate": {"batch_size": 16},
    "mlflow": {"system_metrics": False},
    # 48 images do not reliably leave chance within 5 epochs: tests of other features must not
    # stop as diverged; tests/test_divergence.py and test_recipe.py set their own.
    "divergence": {"after_epochs": 0},
}


def stage_env() -> dict[str, str]:
    """The environment stages run in: the venv first on PATH (dvc.yaml calls `python`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_stage(workdir: Path, stage: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m stages.<stage>` in `workdir`; fails the test with its output on error."""
    out = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=workdir,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"stage {stage} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def tiny_params(overrides: dict[str, dict] | None = None) -> dict[str, dict]:
    """The repo's params.yaml with TINY_PARAMS, then `overrides`, applied section by section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for extra in (TINY_PARAMS, overrides or {}):
        for section, values in extra.items():
            params[section].update(values)
    return params


def write_params(workdir: Path, overrides: dict[str, dict] | None = None) -> Path:
    """Writes `tiny_params(overrides)` as workdir/params.yaml."""
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(overrides), sort_keys=False))
    return path


def copy_project(ws: Path) -> Path:
    """Copies this project's files (tracked, and untracked but not ignored) into `ws`."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, ws / rel)
    return ws


def git_project(ws: Path, overrides: dict[str, dict] | None = None) -> Path:
    """A fresh git + DVC checkout of this project's files in `ws`, with the tiny params."""
    copy_project(ws)
    write_params(ws, overrides)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny profile"], cwd=ws, check=True)
    return ws


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace after the sample, shard and stats stages of the tiny profile (read-only:
    copy it with `workspace_copy` before running later stages)."""
    ws = tmp_path_factory.mktemp("tiny_inputs")
    write_params(ws)
    for stage in ("sample", "shard", "stats"):
        run_stage(ws, stage)
    return ws


@pytest.fixture
def workspace_copy(tiny_inputs: Path, tmp_path: Path):
    """Returns a function making a fresh copy of the tiny inputs under tmp_path/<name>."""

    def copy(name: str, overrides: dict[str, dict] | None = None) -> Path:
        ws = tmp_path / name
        shutil.copytree(tiny_inputs, ws)
        write_params(ws, overrides)
        return ws

    return copy


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServicesInfo]:
    """The S3 server, PostgreSQL and mlflow server of `cli.services` on 127.0.0.1, per module."""
    info = start_services("127.0.0.1", tmp_path_factory.mktemp("services"))
    yield info
    stop_services(info)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server alone on 127.0.0.1 (buckets alexnet, alexnet-dvc), per module."""
    s3 = start_s3("127.0.0.1", tmp_path_factory.mktemp("s3"))
    yield s3
    remove_all((s3.process,), ())


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch):
    """The S3 server's settings in this test's environment (stages it runs inherit them);
    returns a pyarrow client of it."""
    import pyarrow.fs as pafs

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return pafs.S3FileSystem(endpoint_override=s3_server.endpoint, region=s3_server.region)


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """PostgreSQL alone on 127.0.0.1 with MLflow's role and database, per module."""
    pg = start_postgres("127.0.0.1", tmp_path_factory.mktemp("postgres"))
    yield pg
    remove_all((pg.process,), (pg.data_dir,))


def sourced(cluster: Cluster, command: str) -> list[str]:
    """bash running `command` after `source cluster.env`, as a user would, but without
    RAY_AUTH_MODE: a stage must not need it."""
    return ["bash", "-c", f"source {shlex.quote(cluster.env_file)} && unset RAY_AUTH_MODE && {command}"]


def in_sourced_shell(
    cluster: Cluster, command: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> str:
    """Runs `command` in `cwd` with `sourced`; returns stdout; fails the test on an error."""
    argv, env = sourced(cluster, command), env or stage_env()
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"{command} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def namespace_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real Ray cluster for the module: a head and one worker node, each a `ray start` in
    its own network namespace, started and stopped by the code behind `make cluster-up` and
    `make cluster-down` (`cli.localcluster`), with its own state dir and cluster.env."""
    where = tmp_path_factory.mktemp("localcluster")
    with running(where / "state", where / "cluster.env") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def services_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """`namespace_cluster` with `make cluster-up`'s services (`up --services`): moto's S3
    server, PostgreSQL and an `mlflow server` on the cluster's bridge address, their settings
    in cluster.env and the S3 ones in every node's Ray processes."""
    where = tmp_path_factory.mktemp("servicescluster")
    with running(where / "state", where / "cluster.env", services=True) as cluster:
        yield cluster


def exported(cluster: Cluster) -> dict[str, str]:
    """The variables cluster.env exports, as a shell sourcing it would see them."""
    lines = Path(cluster.env_file).read_text().splitlines()
    pairs = (line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    return {k: shlex.split(v)[0] if v else "" for k, v in pairs}
