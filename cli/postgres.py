"""A throwaway PostgreSQL 15 server for MLflow: initdb into a temp folder, TCP on one host.

The cluster gets no Unix socket, listens on the given address only, and accepts only
scram-sha-256 passwords: the superuser `postgres` from the server's own addresses (to set
up), the role `mlflow` on its database `mlflow` from the server's subnets (the namespaces
of a local cluster sit on the bridge's). Both passwords are random per start. The
superuser's exists only in memory and, for initdb, in a 0600 file deleted right after;
the MLflow role's reaches the server as a SCRAM verifier computed here, and clients read
it from a 0600 libpq password file (PGPASSFILE), never from a command line.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cli.procs import ProcessRecord, RunAs, ServiceError, spawn, stop_processes, wait_until
from pipeline.cluster import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DATABASE = ROLE = "mlflow"
SUPERUSER = "postgres"
# First match wins; nothing else may connect (no "local" line: there is no socket).
PG_HBA = f"""\
host  all       {SUPERUSER}  samehost  scram-sha-256
host  {DATABASE}  {ROLE}    samenet   scram-sha-256
"""


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL server with MLflow's role and database."""

    host: str
    port: int
    database: str
    user: str
    password: str = field(repr=False)
    data_dir: Path
    passfile: Path
    process: ProcessRecord

    @property
    def uri(self) -> str:
        """MLflow's backend-store URI, without the password (libpq reads it from PGPASSFILE).

        The driver is named because SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3.
        """
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{self.database}"

    def env(self) -> dict[str, str]:
        """The database settings for `mlflow server` or `psql`: its URI and the password file."""
        return {"MLFLOW_BACKEND_STORE_URI": self.uri, "PGPASSFILE": str(self.passfile)}


def _write_private(path: Path, text: str, owner: RunAs | None) -> None:
    """Creates `path` with mode 0600 (never briefly wider), owned by `owner` if given."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if owner:
        os.chown(path, owner.uid, owner.gid)


def _initdb(data_dir: Path, superuser_password: str, owner: RunAs | None) -> Path:
    """Creates a cluster in data_dir/pgdata with only our pg_hba.conf rules; returns pgdata."""
    initdb = PG_BIN / "initdb"
    if not initdb.is_file():
        raise ServiceError(f"{initdb} not found: install PostgreSQL 15 (apt-get install postgresql-15)")
    pwfile, pgdata = data_dir / "superuser.pw", data_dir / "pgdata"
    _write_private(pwfile, superuser_password + "\n", owner)
    argv = [str(initdb), "-D", str(pgdata), "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth=scram-sha-256"]
    argv += ["--encoding=UTF8", "--locale=C", "--no-sync"]  # a throwaway cluster needs no fsync
    try:
        out = subprocess.run(
            argv,
            cwd=data_dir,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=120,
            **(owner.popen_kwargs() if owner else {}),  # type: ignore[arg-type]
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if out.returncode != 0:
        raise ServiceError(
            f"initdb failed with status {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    hba = pgdata / "pg_hba.conf"
    hba.unlink()
    _write_private(hba, PG_HBA, owner)
    return pgdata


def _connects(host: str, port: int, password: str) -> bool:
    import psycopg2

    try:
        psycopg2.connect(
            host=host, port=port, user=SUPERUSER, password=password, dbname="postgres", connect_timeout=2
        ).close()
        return True
    except psycopg2.OperationalError:
        return False


def _create_mlflow_role(host: str, port: int, superuser_password: str, password: str) -> None:
    """Creates the MLflow role (login, password) and its database."""
    import psycopg2
    from psycopg2.extensions import encrypt_password

    conn = psycopg2.connect(
        host=host, port=port, user=SUPERUSER, password=superuser_password, dbname="postgres"
    )
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            # The server only ever sees the salted verifier, never the password itself.
            verifier = encrypt_password(password, ROLE, conn, "scram-sha-256")
            cur.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD %s", (verifier,))
            cur.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
    finally:
        conn.close()


def start_postgres(
    host: str, state_dir: Path, pg_user: str = "nobody", timeout_s: float = 120.0
) -> PostgresServer:
    """Initialises and starts PostgreSQL on host:<free port>, with MLflow's role and database.

    Args:
        host: The only address it listens on.
        state_dir: Where its log and the 0600 libpq password file go.
        pg_user: The account it runs as when we are root (it refuses to run as root).
        timeout_s: How long it may take to accept connections.

    Returns:
        The server; its data folder is a new temp folder (owned by `pg_user` when we are
        root, in the system temp dir so that user can reach it).

    Raises:
        ServiceError: When initdb fails or the server does not come up.
    """
    owner = RunAs.lookup(pg_user)
    data_dir = Path(tempfile.mkdtemp(prefix="alexnet-pg-"))
    try:
        if owner:
            os.chown(data_dir, owner.uid, owner.gid)
        superuser_password, password = secrets.token_hex(24), secrets.token_hex(24)
        pgdata = _initdb(data_dir, superuser_password, owner)
        port = free_port(host)
        # -k "": no Unix socket; -h: TCP on this address only.
        argv = [str(PG_BIN / "postgres"), "-D", str(pgdata), "-h", host, "-p", str(port), "-k", ""]
        log = state_dir / "postgres.log"
        proc, record = spawn("postgres", argv, log, {"LC_ALL": "C"}, signal.SIGINT, owner, data_dir)
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    try:
        wait_until(lambda: _connects(host, port, superuser_password), proc, record, timeout_s)
        _create_mlflow_role(host, port, superuser_password, password)
        passfile = state_dir / "pgpass"
        # libpq's format host:port:database:user:password; hex passwords need no escaping.
        _write_private(passfile, f"{host}:{port}:{DATABASE}:{ROLE}:{password}\n", None)
    except BaseException:
        stop_processes([record])
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return PostgresServer(host, port, DATABASE, ROLE, password, data_dir, passfile, record)
