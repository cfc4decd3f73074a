"""Object storage access: the one place that turns a URI into a filesystem.

Every URI of every command goes through here: bundles (`model.bundle`), inputs, outputs,
training data and checkpoints (`pipeline/`). It lives at the bottom of the house, in `model/`,
because `model.load_bundle` / `save_bundle` take URIs too; it imports no Ray.

Any fsspec URI works: a local path, ``file://``, ``s3://``, ``gs://``, ``memory://``. For
S3-compatible stores the endpoint comes from, in order: an ``endpoint`` query on the URI
(``s3://bucket/prefix?endpoint=http://127.0.0.1:9000``), then ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` in the environment. Credentials come only from the standard AWS chain;
they never appear in URIs we print (see :func:`redact`).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def split_endpoint(uri: str) -> tuple[str, str | None]:
    """``s3://b/p?endpoint=http://h:9000`` -> (``s3://b/p``, ``http://h:9000``)."""
    parts = urlsplit(uri)
    if not parts.query or parts.scheme not in ("s3", "s3a"):
        return uri, None
    query = dict(parse_qsl(parts.query))
    endpoint = query.pop("endpoint", None)
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    return clean, endpoint


def s3_endpoint(uri: str = "") -> str | None:
    """The S3 endpoint override for ``uri``: its query, else the environment, else None (AWS)."""
    _, endpoint = split_endpoint(uri)
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (``~`` expanded); other URIs unchanged. Ray workers do not
    share the driver's working directory, so every local path is made absolute before it
    travels to them."""
    if is_remote(uri):
        return uri
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


# Transient S3 failures (503 SlowDown, 500, resets, timeouts) are retried with backoff, by
# these settings and not by whatever a library defaults to. A request is tried S3_ATTEMPTS times
# (botocore's "standard" mode: exponential backoff with jitter, at most 20 s between tries; about
# a minute in all for a store that stays down, then the error). AWS_MAX_ATTEMPTS / AWS_RETRY_MODE
# in the environment take precedence. s3fs adds S3FS_RETRIES tries around botocore's for what
# botocore cannot retry (a body cut short while it is read).
S3_ATTEMPTS = 8
S3FS_RETRIES = 2
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60


def s3_attempts() -> int:
    """Tries per S3 request: AWS_MAX_ATTEMPTS when set, else :data:`S3_ATTEMPTS`."""
    try:
        return max(1, int(os.environ["AWS_MAX_ATTEMPTS"]))
    except (KeyError, ValueError):
        return S3_ATTEMPTS


# S3 filesystems made by get_filesystem, kept for reuse: making one builds a botocore client
# (it loads and parses the service's JSON models: ~300 CPU-ms here, bench/storage.py), which a
# worker would otherwise pay for every shard it reads, every part it writes and every commit.
# The key holds everything the filesystem was made from: the process (never shared across a
# fork), the options (endpoint, retries) and the AWS_* environment (credentials, profile,
# region), so a changed environment gets a new one. Listings are never cached in them
# (use_listings_cache).
_S3_FILESYSTEMS: OrderedDict[tuple, fsspec.AbstractFileSystem] = OrderedDict()
_S3_FILESYSTEMS_KEPT = 16
_S3_FILESYSTEMS_LOCK = threading.Lock()


def _s3_filesystem(protocol: str, options: dict) -> fsspec.AbstractFileSystem:
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), protocol, repr(options), aws_env)
    with _S3_FILESYSTEMS_LOCK:
        fs = _S3_FILESYSTEMS.get(key)
        if fs is not None:
            _S3_FILESYSTEMS.move_to_end(key)
            return fs
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    fs.retries = S3FS_RETRIES  # s3fs takes it as an attribute, not an argument
    with _S3_FILESYSTEMS_LOCK:
        _S3_FILESYSTEMS[key] = fs
        while len(_S3_FILESYSTEMS) > _S3_FILESYSTEMS_KEPT:
            _S3_FILESYSTEMS.popitem(last=False)
    return fs


def get_filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URI, with the S3 endpoint override applied.
    S3 filesystems are reused within a process while their settings and AWS_* environment
    stay the same."""
    clean, _ = split_endpoint(uri)
    protocol = urlsplit(clean).scheme
    if protocol not in ("s3", "s3a"):
        return fsspec.core.url_to_fs(clean)
    options: dict = {}
    endpoint = s3_endpoint(uri)
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    options["config_kwargs"] = {
        "retries": {"max_attempts": s3_attempts(),
                    "mode": os.environ.get("AWS_RETRY_MODE", "standard")},
        "connect_timeout": S3_CONNECT_TIMEOUT_S, "read_timeout": S3_READ_TIMEOUT_S}
    # Listings must see what another process just wrote (re-runs, concurrent writers).
    options["use_listings_cache"] = False
    fs = _s3_filesystem(protocol, options)
    return fs, fs._strip_protocol(clean)


def pyarrow_filesystem(uri: str):
    """(pyarrow.fs.FileSystem, path) for ``uri``: what Ray Data's readers and writers take."""
    import pyarrow.fs as pafs

    clean, _ = split_endpoint(uri)
    parts = urlsplit(clean)
    if parts.scheme in ("s3", "s3a"):
        endpoint = s3_endpoint(uri)
        kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(
                            max_attempts=s3_attempts()),
                        "connect_timeout": S3_CONNECT_TIMEOUT_S,
                        "request_timeout": S3_READ_TIMEOUT_S}
        if endpoint:
            split = urlsplit(endpoint)
            kwargs["endpoint_override"] = split.netloc or endpoint
            kwargs["scheme"] = split.scheme or "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), (parts.netloc + parts.path).rstrip("/")
    fs, path = get_filesystem(clean)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *names: str) -> str:
    """Append path components to a URI (keeping an endpoint query where it was)."""
    clean, endpoint = split_endpoint(uri)
    joined = clean.rstrip("/")
    for name in names:
        joined += "/" + name.strip("/")
    if endpoint:
        joined += "?" + urlencode({"endpoint": endpoint})
    return joined


def redact(text: str) -> str:
    """Remove credentials (from the environment or embedded in URLs) from a message."""
    for key in _SECRET_ENV:
        value = os.environ.get(key)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    # user:password@host in URLs
    return re.sub(r"(?<=://)[^/@\s:]+:[^/@\s]+@", "***@", text)


def shown_uri(uri: str, member: str | None = None) -> str:
    """``uri`` as it goes into rows and messages: no endpoint query, no credentials."""
    clean, _ = split_endpoint(uri)
    return redact(clean if member is None else f"{clean}#{member}")


def filesystem_for(uri: str):
    """(fsspec filesystem, path) for ``uri``; a missing package or unknown scheme says so."""
    try:
        return get_filesystem(uri)
    except ImportError as e:
        scheme = uri.split("://", 1)[0]
        raise ImportError(f"reading {scheme}:// needs a package that is missing: {e}") from None
    except ValueError as e:
        if "protocol" not in str(e).lower():
            raise
        scheme = uri.split("://", 1)[0]
        raise ValueError(
            f"unsupported URI scheme {scheme!r} in {shown_uri(uri)}; use a local path, s3://, "
            "gs:// or another fsspec protocol"
        ) from None


@contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn credential and permission failures from object stores into one clear sentence."""
    try:
        yield
    except Exception as error:
        name = type(error).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            raise PermissionError(
                f"no credentials to read {shown_uri(uri)}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role)"
            ) from None
        if isinstance(error, PermissionError):
            raise PermissionError(
                f"access denied to {shown_uri(uri)}; check the credentials and the bucket policy"
            ) from None
        raise
