"""The shared services teams run, started locally as real processes on one host address.

    python -m cli.services up      # S3 server, PostgreSQL, mlflow server on 127.0.0.1
    source services.env            # MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, credentials...
    python -m cli.services down    # stops them and deletes their data

- S3: moto's standalone server (a stand-in for MinIO or AWS), with the buckets created at
  start and IAM authentication switched on after that, so only the access key generated
  for this start is accepted. Its /moto-api/ control endpoints take no credentials (they
  can reset it), one more reason it binds to loopback or a bridge of our own only.
- PostgreSQL 15 from the system's binaries: `initdb` into a fresh temp folder, no Unix
  socket, TCP on the given host only, scram-sha-256 passwords; a role and a database for
  MLflow. When we are root it runs as an unprivileged user (`nobody`): PostgreSQL refuses root.
- `mlflow server` on PostgreSQL with artifacts proxied to `s3://alexnet/mlartifacts`, so
  MLflow clients need only MLFLOW_TRACKING_URI, no S3 credentials.

Secrets are generated per start and never appear on a command line (`ps` shows those):
the MLflow role's password reaches libpq through a 0600 PGPASSFILE, the S3 keys reach the
mlflow server through its environment, and users get them in the 0600 env file.
`start_services(host, state_dir)` is the same thing for other code (tests, the local
multi-node cluster, which passes its bridge address).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cli.postgres import PostgresServer, start_postgres
from cli.procs import ProcessRecord, ServiceError, port_open, spawn, stop_processes, wait_until
from pipeline.cluster import free_port
from pipeline.storage import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
BUCKETS = ("alexnet", "alexnet-dvc")  # data and MLflow artifacts; a DVC remote
MLFLOW_ARTIFACTS = "s3://alexnet/mlartifacts"
START_TIMEOUT_S = 180.0  # mlflow server's first start migrates an empty database
STATE_FILE = "state.json"
# Policy of the one IAM user whose key the S3 server accepts.
S3_POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'


@dataclass(frozen=True)
class S3Server:
    """A running S3 server and the credentials it accepts."""

    endpoint: str
    region: str
    buckets: tuple[str, ...]
    access_key: str
    secret_key: str = field(repr=False)
    process: ProcessRecord

    def env(self) -> dict[str, str]:
        """What boto3, pyarrow and the AWS CLI read to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # Never ask the EC2 metadata address (off this machine) for credentials or a region.
            "AWS_EC2_METADATA_DISABLED": "true",
        }


@dataclass(frozen=True)
class MlflowServer:
    """A running `mlflow server`."""

    uri: str
    artifacts_destination: str
    process: ProcessRecord


@dataclass(frozen=True)
class ServicesInfo:
    """The three services of one `start_services` call."""

    s3: S3Server
    postgres: PostgresServer
    mlflow: MlflowServer
    state_dir: Path

    @property
    def processes(self) -> tuple[ProcessRecord, ...]:
        """Their processes, in the order to stop them (MLflow before its stores)."""
        return (self.mlflow.process, self.postgres.process, self.s3.process)

    def env(self) -> dict[str, str]:
        """Every setting clients need, as environment variables."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow.uri,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # Artifacts come through the server, as they go in: its presigned-URL downloads
            # would send clients to the S3 endpoint with the server's signature, and retry
            # every chunk for minutes when that fails.
            "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
            **self.s3.env(),
            **self.postgres.env(),
        }


def base_env() -> dict[str, str]:
    """Our environment without the caller's AWS, MLflow and libpq settings (each service
    gets exactly the ones meant for it), with MLflow's telemetry off: no traffic leaves.

    `mlflow server`'s job runner (GenAI scorers), which forks seven consumer processes the
    pipeline never uses, is off too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PG"))}
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    return env | quiet | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _provision_s3(endpoint: str, region: str, buckets: tuple[str, ...]) -> tuple[str, str]:
    """Creates an IAM user with full S3 access, its access key and the buckets, then turns
    on authentication: from then on only that key is accepted.

    Returns:
        (access key id, secret access key), generated by the server for this start.
    """
    import boto3
    import botocore.exceptions
    import requests

    def client(service: str, key_id: str, secret: str):
        return boto3.client(
            service,
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )

    # Authentication is still off: any key passes until reset-auth below.
    iam = client("iam", "setup", "setup")
    iam.create_user(UserName="pipeline")
    iam.put_user_policy(UserName="pipeline", PolicyName="s3", PolicyDocument=S3_POLICY)
    key = iam.create_access_key(UserName="pipeline")["AccessKey"]
    access, secret = key["AccessKeyId"], key["SecretAccessKey"]
    s3 = client("s3", access, secret)
    for bucket in buckets:
        s3.create_bucket(Bucket=bucket)
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        client("s3", "setup", "setup").list_buckets()
    except botocore.exceptions.ClientError:
        return access, secret
    raise ServiceError(f"S3 server {endpoint} still accepts any key after enabling authentication")


def start_s3(
    host: str, state_dir: Path, buckets: tuple[str, ...] = BUCKETS, region: str = REGION
) -> S3Server:
    """Starts moto's S3 server on host:<free port> with `buckets` and a fresh access key.

    Raises:
        ServiceError: When it does not come up.
    """
    port = free_port(host)
    endpoint = f"http://{host}:{port}"
    # Authentication stays off (every action allowed) until _provision_s3 has made the key.
    env = base_env() | {"INITIAL_NO_AUTH_ACTION_COUNT": "inf"}
    argv = [sys.executable, "-m", "moto.server", "--host", host, "--port", str(port)]
    proc, record = spawn("s3", argv, state_dir / "s3.log", env)
    try:
        wait_until(lambda: port_open(host, port), proc, record, START_TIMEOUT_S)
        access, secret = _provision_s3(endpoint, region, buckets)
    except BaseException:
        stop_processes([record])
        raise
    return S3Server(endpoint, region, tuple(buckets), access, secret, record)


def _mlflow_ready(uri: str) -> bool:
    import requests

    try:
        return requests.get(f"{uri}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start_mlflow(
    host: str, state_dir: Path, postgres: PostgresServer, s3: S3Server, artifacts: str = MLFLOW_ARTIFACTS
) -> MlflowServer:
    """Starts `mlflow server` on host:<free port>, runs on `postgres`, artifacts proxied to `s3`.

    Raises:
        ServiceError: When it does not come up.
    """
    port = free_port(host)
    uri = f"http://{host}:{port}"
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host", host,
        "--port", str(port),
        "--workers", "1",
        # A database that stops answering fails a request in 10 s instead of hanging it.
        "--backend-store-uri", f"{postgres.uri}?connect_timeout=10",
        "--artifacts-destination", artifacts,
        "--serve-artifacts",
        # The Host header clients send: the address we bind to and nothing else.
        "--allowed-hosts", f"{host}:{port}",
    ]  # fmt: skip
    env = base_env() | s3.env() | postgres.env() | {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    proc, record = spawn("mlflow", argv, state_dir / "mlflow.log", env)
    try:
        wait_until(lambda: _mlflow_ready(uri), proc, record, START_TIMEOUT_S)
    except BaseException:
        stop_processes([record])
        raise
    return MlflowServer(uri, artifacts, record)


def start_services(host: str, state_dir: Path, pg_user: str = "nobody") -> ServicesInfo:
    """Starts the S3 server, PostgreSQL and mlflow server on `host`, each on a free port.

    Args:
        host: The address every service binds to (127.0.0.1, or a bridge address that
            network namespaces reach).
        state_dir: An existing folder for logs and the PostgreSQL password file; removed by
            `stop_services`.
        pg_user: The account PostgreSQL runs as when we are root.

    Raises:
        ServiceError: When a service does not come up; those already started are stopped.
    """
    started: list[ProcessRecord] = []
    data_dirs: list[Path] = []
    try:
        s3 = start_s3(host, state_dir)
        started.append(s3.process)
        postgres = start_postgres(host, state_dir, pg_user, START_TIMEOUT_S)
        started.append(postgres.process)
        data_dirs.append(postgres.data_dir)
        mlflow = start_mlflow(host, state_dir, postgres, s3)
    except BaseException:
        stop_processes(reversed(started))
        for path in data_dirs:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return ServicesInfo(s3, postgres, mlflow, state_dir)


def stop_services(info: ServicesInfo) -> None:
    """Stops the services of `info` and deletes their data and `info.state_dir`."""
    remove_all(info.processes, (info.postgres.data_dir, info.state_dir))


def remove_all(processes: tuple[ProcessRecord, ...], paths: tuple[Path, ...]) -> None:
    """Stops `processes` in order, then deletes `paths`."""
    stop_processes(processes)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def export_lines(env: Mapping[str, str]) -> str:
    """`env` as shell `export` lines, values quoted for sh."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def save_state(info: ServicesInfo, path: Path) -> None:
    """Records what `down` stops and deletes (pids, start times, folders; no secrets)."""
    state = {
        "processes": [p.to_json() for p in info.processes],
        "paths": [str(info.postgres.data_dir), str(info.state_dir)],
    }
    atomic_write_text(path, json.dumps(state, indent=1) + "\n", mode=0o600)


def load_state(path: Path) -> tuple[tuple[ProcessRecord, ...], tuple[Path, ...]]:
    """The processes and folders `save_state` recorded.

    Raises:
        ServiceError: When the file is missing or is not a state file.
    """
    try:
        state = json.loads(path.read_text())
        return tuple(ProcessRecord.from_json(p) for p in state["processes"]), tuple(map(Path, state["paths"]))
    except FileNotFoundError as e:
        raise ServiceError(
            f"{path}: no services state here; nothing to stop (were they started with up?)"
        ) from e
    except (ValueError, KeyError, TypeError) as e:
        raise ServiceError(f"{path}: not a services state file ({e}); stop the servers by hand") from e


def _up(host: str, state_dir: Path, env_file: Path) -> None:
    state = state_dir / STATE_FILE
    if state.exists():
        raise ServiceError(
            f"{state} exists: services are already up; run `python -m cli.services down` first"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    info = start_services(host, state_dir)
    save_state(info, state)
    atomic_write_text(env_file, export_lines(info.env()), mode=0o600)
    print(f"S3 {info.s3.endpoint} (buckets {', '.join(info.s3.buckets)}), PostgreSQL {info.postgres.uri}, ")
    print(f"MLflow {info.mlflow.uri}; settings in {env_file}: source it")


def _down(state_dir: Path, env_file: Path) -> None:
    processes, paths = load_state(state_dir / STATE_FILE)
    remove_all(processes, paths)
    env_file.unlink(missing_ok=True)
    print(f"stopped {', '.join(p.name for p in processes)}; deleted {', '.join(map(str, paths))}")


def main(argv: list[str] | None = None) -> int:
    """`python -m cli.services up|down`."""
    parser = argparse.ArgumentParser(prog="python -m cli.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--host", default="127.0.0.1", help="address the services bind to")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".services", help="logs and state")
    parser.add_argument("--env-file", type=Path, default=ROOT / "services.env", help="settings for clients")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            _up(args.host, args.state_dir.resolve(), args.env_file)
        else:
            _down(args.state_dir.resolve(), args.env_file)
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
