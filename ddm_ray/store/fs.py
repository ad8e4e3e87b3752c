"""fsspec access for run folders and data: local paths, file:// and s3:// (through s3fs).

S3 endpoint, region and credentials come from explicit storage options first, then from the
standard AWS environment variables, which are passed to s3fs explicitly.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from ddm_ray.errors import ConfigError

S3_OPTION_KEYS = ("endpoint_url", "region", "key", "secret", "token", "anon", "profile", "use_ssl",
                  "requester_pays")


SECRET_KEYS = ("key", "secret", "token", "password", "sas_token", "account_key", "client_secret")


def redact(url: str) -> str:
    """A URL safe to write or print: query string (presigned signatures, SAS tokens) and any
    password in the authority replaced by <redacted>. Plain paths come back unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in url and "?" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "<redacted>@" + netloc.rsplit("@", 1)[1]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, "<redacted>" if parts.fragment else ""))


def storage_options_file(path: str) -> dict[str, str]:
    """key=value lines (# comments) from a file: where credentials for --storage-option go when
    they are not in the environment. Raises ConfigError with one line."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--storage-options-file {path}: {e.strerror or e}") from None
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ConfigError(f"--storage-options-file {path}: line {n} is not key=value")
        k, v = line.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def s3_options(storage_options: dict[str, str]) -> dict[str, Any]:
    """s3fs keyword arguments from `key=value` options and the AWS environment variables."""
    unknown = sorted(set(storage_options) - set(S3_OPTION_KEYS))
    if unknown:
        raise ConfigError(f"unknown --storage-option {unknown[0]!r}; known: {', '.join(S3_OPTION_KEYS)}")
    opts: dict[str, Any] = {}
    client: dict[str, Any] = {}
    so = dict(storage_options)
    endpoint = so.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    region = so.pop("region", None) or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION"
    )
    if endpoint:
        client["endpoint_url"] = endpoint
    if region:
        client["region_name"] = region
    key = so.pop("key", None) or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = so.pop("secret", None) or os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = so.pop("token", None) or os.environ.get("AWS_SESSION_TOKEN")
    if key:
        opts["key"] = key
    if secret:
        opts["secret"] = secret
    if token:
        opts["token"] = token
    if so.pop("anon", "false").lower() in ("1", "true", "yes"):
        opts["anon"] = True
    for flag in ("use_ssl", "requester_pays"):
        if flag in so:
            opts[flag] = so.pop(flag).lower() in ("1", "true", "yes")
    if client:
        opts["client_kwargs"] = client
    opts.update(so)
    return opts


def open_url(url: str, storage_options: dict[str, str] | None = None) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path) for a local path or URL."""
    so = storage_options or {}
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        if protocol in ("s3", "s3a"):
            fs = fsspec.filesystem("s3", **s3_options(so))
            path = url.split("://", 1)[1]
        else:
            fs, path = fsspec.core.url_to_fs(url, **so)
    except (ImportError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot open {redact(url)}: {e}") from None
    if protocol == "file":
        path = os.path.abspath(path)
    return fs, path.rstrip("/")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


_ENV_OPTIONS = (
    ("endpoint_url", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    ("region", ("AWS_REGION", "AWS_DEFAULT_REGION")),
    ("key", ("AWS_ACCESS_KEY_ID",)),
    ("secret", ("AWS_SECRET_ACCESS_KEY",)),
    ("token", ("AWS_SESSION_TOKEN",)),
)


def with_env_options(url: str, storage_options: dict[str, str]) -> dict[str, str]:
    """storage_options plus the driver's AWS environment for an s3:// URL, made explicit.

    Remote workers do not see the driver's environment; what the driver resolved travels with
    the job instead. Explicit options win; nothing is added for non-S3 URLs or unset variables
    (workers then use their own credentials, e.g. an instance role).
    """
    out = dict(storage_options)
    if not url.startswith(("s3://", "s3a://")):
        return out
    for key, names in _ENV_OPTIONS:
        if key in out:
            continue
        for name in names:
            if os.environ.get(name):
                out[key] = os.environ[name]
                break
    return out


def _arrow_fs(fs: Any) -> Any:
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return LocalFileSystem()
    return PyFileSystem(FSSpecHandler(fs))


def read_parquet(fs: Any, path: str) -> Any:
    """A whole Parquet file as a pyarrow Table, read by path through a pyarrow filesystem.

    Never from an in-memory buffer: with torch imported, tables read from a BytesIO sometimes
    abort the interpreter at exit (exit 134); reading by path did not in any try."""
    import pyarrow.parquet as pq

    return pq.read_table(path, filesystem=_arrow_fs(fs))


def parquet_schema(fs: Any, path: str) -> Any:
    """The Arrow schema of a Parquet file (with its metadata) and its row count, from the
    footer alone: (schema, num_rows)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, filesystem=_arrow_fs(fs))
    return pf.schema_arrow, pf.metadata.num_rows


def read_parquet_part(fs: Any, path: str, columns: list[str], max_rows: int | None = None,
                      batch_rows: int = 65_536) -> Any:
    """Only `columns` of a Parquet file, and only its first `max_rows` rows when given: row
    groups past them are never read (a pyarrow Table, by path like `read_parquet`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if max_rows is None:
        return pq.read_table(path, columns=columns, filesystem=_arrow_fs(fs))
    pf = pq.ParquetFile(path, filesystem=_arrow_fs(fs))
    batches, rows = [], 0
    for batch in pf.iter_batches(batch_size=max(1, min(batch_rows, max_rows)), columns=columns):
        batches.append(batch)
        rows += batch.num_rows
        if rows >= max_rows:
            break
    schema = pf.schema_arrow
    schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    table = pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()
    return table.slice(0, max_rows)
