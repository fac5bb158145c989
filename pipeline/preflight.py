"""Fail-fast checks of storage and database settings, run before a stage does any work.

Wrong S3 credentials, a missing bucket, an unreachable S3 endpoint or an unreachable
database each stop the stage within seconds with a message that names the setting, the
URI and what to check, instead of a retry loop or a stack trace from deep inside Ray.

The S3 endpoint: pyarrow 25's `FileSystem.from_uri("s3://...")` reads AWS_ENDPOINT_URL
(and AWS_ENDPOINT_URL_S3) from the environment, but a bare `S3FileSystem()` ignores them
and goes to AWS; neither bounds the AWS SDK's connect and request waits or its retries.
`s3_filesystem` builds one from the environment with explicit timeouts and retry limit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from pyarrow import fs as pafs

# Worst case of one check: 2 attempts x (3 s to connect + 5 s without a byte) = 16 s, < 30 s.
CHECK_CONNECT_TIMEOUT_S = 3.0
CHECK_REQUEST_TIMEOUT_S = 5.0
CHECK_MAX_ATTEMPTS = 2
DB_CONNECT_TIMEOUT_S = 5  # libpq takes whole seconds

_CREDENTIAL_ERRORS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN")


class PreflightError(RuntimeError):
    """A setting is wrong or what it points at cannot be reached; the message says which."""


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(
    connect_timeout_s: float = CHECK_CONNECT_TIMEOUT_S,
    request_timeout_s: float = CHECK_REQUEST_TIMEOUT_S,
    max_attempts: int = CHECK_MAX_ATTEMPTS,
) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem configured from the environment, with bounded waits.

    Endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, region from AWS_REGION /
    AWS_DEFAULT_REGION, credentials from the AWS SDK's default chain (AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY first).

    Args:
        connect_timeout_s: Limit on opening a connection.
        request_timeout_s: Limit on a request that transfers no byte (the SDK's request
            timeout is curl's low-speed limit, so long uploads that progress are not cut).
        max_attempts: Attempts per request, the first included.
    """
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return pafs.S3FileSystem(
        endpoint_override=s3_endpoint(),
        region=region,
        connect_timeout=connect_timeout_s,
        request_timeout=request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
    )


def _endpoint_words() -> str:
    endpoint = s3_endpoint()
    return (
        f"endpoint {endpoint} (AWS_ENDPOINT_URL)"
        if endpoint
        else "AWS's endpoint (AWS_ENDPOINT_URL is unset)"
    )


def _explain_s3_error(error: OSError, uri: str, setting: str, bucket: str) -> str:
    """What went wrong reaching `bucket`, in words, from pyarrow's `AWS Error <CODE>` text."""
    code = m.group(1) if (m := re.search(r"AWS Error (\w+)", str(error))) else ""
    where = f"{setting}={uri}: S3 at {_endpoint_words()}"
    if code in _CREDENTIAL_ERRORS:
        return (
            f"{where} rejected the credentials ({code}): check AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, and that this key may use bucket {bucket!r}."
        )
    if code == "NETWORK_CONNECTION":
        return f"{where} is unreachable: check AWS_ENDPOINT_URL and that the S3 server runs ({error})."
    return f"{where} failed on bucket {bucket!r}: {error}"


def check_s3_uri(uri: str, setting: str, filesystem: pafs.S3FileSystem | None = None) -> None:
    """Checks that the bucket of an `s3://` URI exists and the credentials may use it.

    Args:
        uri: `s3://bucket/prefix`.
        setting: The setting it came from (`data.shards`), for the message.
        filesystem: The filesystem to check with; `s3_filesystem()` when None.

    Raises:
        PreflightError: Naming the setting, URI, endpoint and what to check.
    """
    bucket = urlsplit(uri).netloc
    if not uri.startswith("s3://") or not bucket:
        raise PreflightError(f"{setting}={uri}: expected s3://bucket/prefix")
    missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]
    if len(missing) == 1:
        raise PreflightError(f"{setting}={uri}: {missing[0]} is not set while its partner is: set both")
    try:
        info = (filesystem or s3_filesystem()).get_file_info(bucket)
    except OSError as e:
        raise PreflightError(_explain_s3_error(e, uri, setting, bucket)) from e
    if info.type == pafs.FileType.NotFound:
        raise PreflightError(
            f"{setting}={uri}: bucket {bucket!r} does not exist at {_endpoint_words()}: "
            f"create it, or correct {setting}."
        )


def check_storage(settings: Mapping[str, str]) -> None:
    """Runs `check_s3_uri` on each setting whose value is an `s3://` URI (local paths and
    other schemes are not checked here), each bucket once.

    Args:
        settings: Setting name to value, e.g. {"data.shards": "s3://alexnet/shards"}.

    Raises:
        PreflightError: For the first setting that fails.
    """
    seen: set[str] = set()
    filesystem = None
    for setting, value in settings.items():
        bucket = urlsplit(value).netloc
        if value.startswith("s3://") and bucket not in seen:
            filesystem = filesystem or s3_filesystem()
            check_s3_uri(value, setting, filesystem)
            seen.add(bucket)


def redact_uri(uri: str) -> str:
    """`uri` with any password in it replaced by ***."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_database(uri: str, setting: str, timeout_s: int = DB_CONNECT_TIMEOUT_S) -> None:
    """Checks that a PostgreSQL URI (`postgresql[+driver]://user@host:port/db`) accepts a login.

    The password comes from the URI, PGPASSWORD or the PGPASSFILE, as libpq finds it.

    Raises:
        PreflightError: Naming the setting and the URI (password redacted), with libpq's reason.
    """
    import psycopg2

    libpq_uri = re.sub(r"^postgres(ql)?\+\w+://", "postgresql://", uri)
    try:
        psycopg2.connect(libpq_uri, connect_timeout=timeout_s).close()
    except psycopg2.Error as e:
        reason = " ".join(str(e).split())
        raise PreflightError(
            f"{setting}={redact_uri(uri)}: cannot log in to the database: {reason}. Check the host and "
            "port, that PostgreSQL runs, and the password (PGPASSFILE or PGPASSWORD)."
        ) from e
