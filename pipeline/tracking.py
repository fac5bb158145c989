"""MLflow tracking: one run per trained model, shared by the train and evaluate stages.

Why one run with stage-prefixed keys rather than a parent with child runs per stage: DVC
reruns only the stages whose inputs changed, so a "pipeline execution" is not one
process; what people compare in the MLflow UI is trained models. The train stage opens the
run (params, data version, code version, per-epoch metrics, shard and stats reports), the
evaluate stage reopens it by id (recorded next to the model) and adds the evaluation
metrics, plots and the registered model.

The tracking URI comes from MLFLOW_TRACKING_URI, else a SQLite store in the working
directory (`mlflow.db`), which `make ui` serves on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.preflight import redact_uri

DEFAULT_STORE = "mlflow.db"
_log = logging.getLogger(__name__)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the local SQLite store (absolute, so Ray workers
    started in other folders write to the same file)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


@dataclass(frozen=True)
class RunRef:
    """One MLflow run on one tracking server: what a Ray worker needs to log into it."""

    tracking_uri: str
    run_id: str


def connect() -> str:
    """Points this process's MLflow at the tracking URI, after checking that it answers.

    MLflow's system-metrics monitor keeps its warnings but not its INFO lines (started,
    stopping, terminated, no GPU to watch), which said nothing a person acts on.

    Returns:
        The tracking URI.

    Raises:
        RuntimeError: An HTTP tracking server that does not answer (before any work).
    """
    import mlflow

    uri = tracking_uri()
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    return uri


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fails fast when the tracking store cannot be used: an HTTP server that does not
    answer or cannot read its backend store, or a PostgreSQL store that refuses a login.

    Raises:
        RuntimeError: Naming the URI and the cause, before any training starts.
    """
    if uri.startswith(("postgresql", "postgres:")):
        from pipeline.preflight import check_database

        check_database(uri, "MLFLOW_TRACKING_URI", int(timeout_s))
        return
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as e:
        raise RuntimeError(
            f"MLflow tracking server {redact_uri(uri)} (MLFLOW_TRACKING_URI) is unreachable: {e}. "
            "Start it, or unset MLFLOW_TRACKING_URI to use the local store."
        ) from e
    _check_server_store(uri, timeout_s)


def _check_server_store(uri: str, timeout_s: float) -> None:
    """Asks the server for one experiment: /health answers even when its database is gone."""
    import requests

    try:
        reply = requests.get(
            uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            timeout=timeout_s,
        )
    except requests.RequestException as e:
        cause = f"no answer to a query within {timeout_s:.0f} s ({e})"
    else:
        if reply.status_code < 500:
            return
        cause = f"HTTP {reply.status_code}: {' '.join(reply.text.split())[:300]}"
    raise RuntimeError(
        f"MLflow tracking server {redact_uri(uri)} (MLFLOW_TRACKING_URI) is up but cannot read its backend "
        f"store: {cause}. Check the server's database (its --backend-store-uri) and the server's log."
    )


# MLflow 3's UI opens an experiment without this tag on an empty GenAI overview; with it,
# on the runs table of a model-training experiment.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def use_experiment(name: str) -> str:
    """Makes `name` the active MLflow experiment (created if new), tagged as one of model
    training runs so the UI opens on its runs.

    Safe when several trainings start at once on one tracking server: the experiment is
    created with its tag in one request, and the process whose create loses the race
    (RESOURCE_ALREADY_EXISTS) uses the winner's. Not `mlflow.set_experiment(name)`: on that
    race it returns the experiment without making it active, so the losing process's run
    went to the Default experiment (id 0); nor a separate tag request, which two processes
    sent at once and PostgreSQL refused one of (duplicate key).

    A new experiment in a SQLite store keeps its artifacts in `mlruns` beside the database
    file. MLflow's default, ./mlruns of the creating process's working directory, is for a
    Ray job (`cli.submit`) the job's temporary copy of the code, gone with the job.

    Returns:
        The experiment id.
    """
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name) or _create_experiment(client, name)
    key, kind = EXPERIMENT_KIND
    if experiment.tags.get(key) != kind:  # made by an older version or by hand
        _tag_experiment(client, experiment.experiment_id)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def _create_experiment(client: Any, name: str) -> Any:
    """Creates experiment `name` with EXPERIMENT_KIND, or finds the one a concurrent
    process created first; returns it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri, location = mlflow.get_tracking_uri(), None
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()  # sqlite:////abs/x.db -> /abs/x.db
        location = (database.parent / "mlruns").as_uri()
    try:
        client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.get_experiment_by_name(name)


def _tag_experiment(client: Any, experiment_id: str) -> None:
    """Sets EXPERIMENT_KIND on an experiment; a concurrent process setting it first is fine."""
    from mlflow.exceptions import MlflowException

    key, kind = EXPERIMENT_KIND
    try:
        client.set_experiment_tag(experiment_id, key, kind)
    except MlflowException:
        if client.get_experiment(experiment_id).tags.get(key) != kind:
            raise


def git_tags(repo: str | Path = ".") -> dict[str, str]:
    """The code version: commit and whether the tree has uncommitted changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"git_commit": "unknown"}
    return {"git_commit": commit, "git_dirty": str(bool(git("status", "--porcelain"))).lower()}


def dvc_out_hashes(stage: str, lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """md5 of each output of a DVC stage, from dvc.lock ({} before the first repro)."""
    lock = Path(lock_file)
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {o["path"]: o.get("md5", "") for o in stages.get(stage, {}).get("outs", [])}


def run_tags() -> dict[str, str]:
    """Tags every run carries: code version, data version, DVC experiment name."""
    tags = git_tags()
    tags.update({f"dvc.shard.{path}": md5 for path, md5 in dvc_out_hashes("shard").items()})
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


# MLflow's HTTP settings for the epoch logger's own requests: no retries and a short
# timeout (s), so a lost tracking server costs an epoch one failed request, not MLflow's
# default backoff (7 retries, factor 2: minutes); what fails is sent after the next epoch.
LOGGER_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


@contextlib.contextmanager
def _logger_requests() -> Iterator[None]:
    """Applies LOGGER_HTTP while the block runs (MLflow reads them at each request), then
    restores the process's own settings."""
    saved = {k: os.environ.get(k) for k in LOGGER_HTTP}
    os.environ.update(LOGGER_HTTP)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class EpochLogger:
    """Per-epoch metrics from the rank-0 Ray Train worker, with step = epoch, each epoch
    logged once per run, through outages of the tracking server.

    After a resume, an epoch may be trained again (the interruption came after its metrics
    were logged but before its checkpoint was registered) or not logged yet (the other way
    round). Steps the run already holds are skipped (with fixed seeds the retrained epoch
    reproduces them exactly) and checkpointed epochs it lacks are backfilled.

    An epoch the server does not take (unreachable, or failing) stays buffered, training goes
    on, and the buffer is sent, oldest first, after the next epoch. After a failure the run's
    logged steps are read again before sending, so a batch the server stored but whose answer
    was lost is not sent twice; a resent batch keeps its first timestamps, which MLflow's SQL
    store would also deduplicate.
    """

    def __init__(self, run: RunRef) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=run.tracking_uri)
        self.run = run
        self.logged: set[int] | None = None  # steps the run holds; None: ask the server first
        self.pending: dict[int, list[Any]] = {}  # step -> its mlflow Metrics, not yet sent
        self.outage = False
        self.flush()

    def log_epoch(self, metrics: dict[str, float]) -> None:
        """Logs one epoch's metrics (every key but `epoch` itself) unless the run holds them;
        buffers them while the server does not take them."""
        self._buffer(metrics)
        self.flush()

    def backfill(self, history: list[dict[str, float]]) -> None:
        """Logs the checkpointed epochs the run does not hold yet (one attempt for all)."""
        for metrics in history:
            self._buffer(metrics)
        self.flush()

    def _buffer(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        step, now = int(metrics["epoch"]), int(time.time() * 1000)
        if step not in self.pending and not (self.logged and step in self.logged):
            self.pending[step] = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]

    def require(self, history: list[dict[str, float]]) -> None:
        """Logs every epoch of a finished training the run lacks (the worker may have ended
        with some buffered); the run is complete only when all are logged.

        Raises:
            RuntimeError: The server did not take them, naming it and the epochs.
        """
        self.backfill(history)
        if self.pending:
            raise RuntimeError(
                f"MLflow tracking server {redact_uri(self.run.tracking_uri)} does not answer: the metrics "
                f"of epochs {sorted(self.pending)} of run {self.run.run_id} could not be logged or checked; "
                "training is done and checkpointed: rerun the stage when the server is back, it resumes "
                "and logs what the run lacks"
            )

    def flush(self) -> bool:
        """Sends the buffered epochs the run lacks, oldest first.

        Returns:
            Whether the server took them all (nothing is left buffered).
        """
        import requests
        from mlflow.exceptions import MlflowException

        try:
            with _logger_requests():
                if self.logged is None:
                    history = self.client.get_metric_history(self.run.run_id, "val_top1_error")
                    self.logged = {m.step for m in history}
                for step in sorted(self.pending):
                    if step not in self.logged:
                        self.client.log_batch(self.run.run_id, metrics=self.pending[step])
                        self.logged.add(step)
                    del self.pending[step]
        except (MlflowException, requests.RequestException, OSError) as e:
            self.logged = None
            if not self.outage:
                _log.warning(
                    "MLflow tracking server %s does not take metrics (%s); epochs not logged stay "
                    "buffered and are sent after the next epoch",
                    self.run.tracking_uri,
                    " ".join(str(e).split())[:300],
                )
            self.outage = True
            return False
        if self.outage:
            _log.warning("MLflow tracking server %s is back: buffered epochs logged", self.run.tracking_uri)
        self.outage = False
        return True


def log_dataset(path: str, digest: str, name: str, context: str) -> None:
    """Records a data input of the active run, with the DVC hash as its digest."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # MLflow registers its local artifact source twice (schemes "" and "file"), so a local
        # path matches both; they are the same source, and MLflow picks the first.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(path).resolve()) if "://" not in path else path)
    mlflow.log_input(MetaDataset(source=source, name=name, digest=digest[:36] or None), context=context)


def require_not_diverged(run_id: str) -> None:
    """Refuses to go on with a run the train stage tagged `diverged` (its model must never
    be registered or made `candidate`).

    Raises:
        RuntimeError: Naming the run and the recorded reason.
    """
    from mlflow import MlflowClient

    tags = MlflowClient().get_run(run_id).data.tags
    if tags.get("diverged") == "true":
        raise RuntimeError(
            f"MLflow run {run_id} diverged in training "
            f"({tags.get('diverged_reason', 'no reason recorded')}): its model is not evaluated or registered"
        )


def register_model(run_id: str, model_name: str, val_top1_error: float) -> dict[str, Any]:
    """Aliases the run's newest registered version `candidate`, and `champion` when its
    val top-1 error beats the current champion's.

    Returns:
        {"version", "champion" (bool), "previous_champion_error"}.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    version = max(versions, key=lambda v: int(v.version))
    client.set_model_version_tag(model_name, version.version, "val_top1_error", repr(val_top1_error))
    client.set_registered_model_alias(model_name, "candidate", version.version)
    try:
        champ = client.get_model_version_by_alias(model_name, "champion")
        previous = float(champ.tags.get("val_top1_error", "inf"))
    except MlflowException:
        previous = float("inf")
    is_champion = val_top1_error < previous
    if is_champion:
        client.set_registered_model_alias(model_name, "champion", version.version)
    return {"version": int(version.version), "champion": is_champion, "previous_champion_error": previous}
