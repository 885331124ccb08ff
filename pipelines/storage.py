"""Storage access for the pipelines: fsspec filesystems, credentials, and keeping secrets out of logs.

Owns: storage options for a URL (explicit ones over the standard AWS environment variables, copied so
that tasks on other nodes reach the same bucket), redacting options and URLs before they are logged
or stored, and resolving a URL to (filesystem, path). Does not own: what is read or written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

from flextok.runs import MODEL_FILE

_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")
# Query parameters that sign or authorise a URL (S3/GCS presigned URLs, Azure SAS, API tokens).
_SIGNED_QUERY_WORDS = _SECRET_WORDS + ("sig", "signature", "auth", "policy", "pass")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,;:)\]]")


# Storage options ----------------------------------------------------------------------------------
def effective_storage_options(url: str, explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Storage options for `url`: the explicit ones over what the standard AWS variables say.

    The driver's environment is copied into the options so that tasks on other nodes (which do not
    share the driver's environment) reach the same bucket with the same credentials.
    """
    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("file", "local"):
        return {}  # options are for remote stores; the local filesystem takes none
    opts: dict[str, Any] = dict(explicit or {})
    if protocol not in ("s3", "s3a"):
        return opts
    env = os.environ
    if "key" not in opts and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"] = env["AWS_ACCESS_KEY_ID"]
        opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            opts["token"] = env["AWS_SESSION_TOKEN"]
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    client_kwargs = dict(opts.get("client_kwargs") or {})
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
        opts["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region and "region_name" not in client_kwargs:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    # Listings must be fresh: markers and staged pieces appear while we run.
    opts.setdefault("use_listings_cache", False)
    return opts


def redact_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """A copy safe to log or store: values of secret-looking keys replaced by '***'."""
    out: dict[str, Any] = {}
    for k, v in opts.items():
        if isinstance(v, Mapping):
            out[k] = redact_options(v)
        elif any(word in k.lower() for word in _SECRET_WORDS):
            out[k] = "***"
        else:
            out[k] = v
    return out


def redact_url(url: str) -> str:
    """A URL safe to log or store: no user:password@ part, signing query parameters as '***'.

    Every URL that becomes a record (token and error rows' `source`, done markers, the manifest,
    error messages, log lines) goes through this or `redact_text`.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        netloc = netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(any(w in k.lower() for w in _SIGNED_QUERY_WORDS) for k, _ in pairs):
            query = urlencode([(k, "***" if any(w in k.lower() for w in _SIGNED_QUERY_WORDS) else v)
                               for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (exception messages quote the URLs they failed on)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def preflight(url: str, storage_options: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, where storage cannot work at all: an S3 endpoint that does not answer
    (botocore would retry for minutes) or no S3 credentials anywhere. Transient faults of a store that
    answers are not judged here."""
    import socket

    if fsspec.utils.get_protocol(url) not in ("s3", "s3a"):
        return
    opts = dict(storage_options or {})
    client_kwargs = dict(opts.get("client_kwargs") or {})
    endpoint = opts.get("endpoint_url") or client_kwargs.get("endpoint_url")
    if endpoint:
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
        except OSError as e:
            raise ConnectionError(f"the S3 endpoint {redact_url(endpoint)} does not answer "
                                  f"({e.strerror or type(e).__name__}); check AWS_ENDPOINT_URL or --storage-options") from None
    if opts.get("anon") or opts.get("key") or opts.get("profile"):
        return
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise PermissionError(
            f"no S3 credentials for {redact_url(url)}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS "
            "profile), or pass --storage-options '{\"anon\": true}' for a public bucket")


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL."""
    return url_to_fs(url, **dict(storage_options or {}))


# Remote checkpoints -------------------------------------------------------------------------------
RELEASE_CONFIG = "config.json"  # an official release's settings beside its weights (flextok.official)


def _digest(path: str, record: str) -> str:
    """sha256 of a cached file, hashed once per copy: the digest is kept in `record` with the file's
    size and mtime, and read from there while they still match (each actor of a node would otherwise
    hash the whole checkpoint again: 10 GB for d18_d28)."""
    from flextok.checkpoint import file_sha256

    st = os.stat(path)
    stamp = f"{st.st_size} {st.st_mtime_ns}"
    try:
        with open(record) as f:
            digest, _, recorded = f.read().strip().partition(" ")
        if recorded == stamp:
            return digest
    except OSError:
        pass
    digest = file_sha256(path)
    with open(f"{record}.tmp", "w") as f:
        f.write(f"{digest} {stamp}")
    os.replace(f"{record}.tmp", record)
    return digest


def fetch_checkpoint(url: str, storage_options: Mapping[str, Any] | None = None, *, cache_dir: str | None = None,
                     sha256: str | None = None) -> str:
    """A checkpoint file or run folder at any fsspec URL -> a local path the loaders can read.

    Local paths come back unchanged (a folder stays a folder: the loaders pick its checkpoint). A
    remote `.safetensors` file is downloaded; a remote run folder gives its `model.safetensors` when
    finished, else the newest `checkpoint_*/model.safetensors`; a `config.json` beside the weights (an
    official release's settings) comes along into the same folder. Downloads are cached under
    `cache_dir` (default `$XDG_CACHE_HOME/flextok/checkpoints`) by URL, size and ETag/mtime, and land
    under a temporary name first, so an interrupted download is never taken for a checkpoint. A lock
    file makes the processes of one node (every encoder actor) download it once, the others wait.
    With `sha256`, the cached file must have that digest (a copy that does not is fetched again; one
    that still does not is an error): every actor of a job then loads the bytes the driver checked.
    Storage calls are retried through transient faults (`pipelines.retry`).
    """
    import fcntl
    import hashlib
    import posixpath

    from flextok.runs import newest_model
    from pipelines.retry import call_with_retries

    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("file", "local"):
        return url
    opts = effective_storage_options(url, storage_options)
    fs, path = filesystem(url, opts)
    path = path.rstrip("/")

    def locate() -> tuple[str, dict]:
        target = path
        if not fs.exists(target):
            raise FileNotFoundError(f"checkpoint not found: {redact_url(url)}")
        if fs.isdir(target):
            names = [posixpath.basename(e.rstrip("/")) for e in fs.ls(target, detail=False)]
            found = newest_model(names, lambda rel: fs.exists(f"{target}/{rel}"))
            if found is None:
                raise FileNotFoundError(f"no {MODEL_FILE} in run folder {redact_url(url)} or its checkpoints")
            target = f"{target}/{found}"
        return target, fs.info(target)

    path, info = call_with_retries(locate, what=f"looking up {redact_url(url)}")
    config_path = f"{posixpath.dirname(path)}/{RELEASE_CONFIG}"  # an official release's, beside its weights
    config_info = call_with_retries(lambda: fs.info(config_path) if fs.exists(config_path) else None,
                                    what=f"looking up {redact_url(url)}'s {RELEASE_CONFIG}")
    stamp = "|".join(f"{protocol}://{p}|{i.get('size')}|{i.get('ETag') or i.get('LastModified') or i.get('mtime')}"
                     for p, i in ((path, info), (config_path, config_info)) if i is not None)
    root = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flextok", "checkpoints")
    local = os.path.join(root, hashlib.sha256(stamp.encode()).hexdigest()[:24], posixpath.basename(path))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(f"{local}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; released when the file closes
        tmp = f"{local}.part-{os.getpid()}"
        local_config = os.path.join(os.path.dirname(local), RELEASE_CONFIG)
        if config_info is not None and not os.path.isfile(local_config):  # before the weights: they mark done
            call_with_retries(lambda: fs.get(config_path, tmp), what=f"downloading {redact_url(url)}'s {RELEASE_CONFIG}")
            os.replace(tmp, local_config)
        checked = f"{local}.sha256"  # "<digest> <size> <mtime_ns>" of the copy, once hashed
        for _ in range(2):
            if not os.path.isfile(local):
                call_with_retries(lambda: fs.get(path, tmp), what=f"downloading {redact_url(url)}")
                os.replace(tmp, local)
            if sha256 is None or _digest(local, checked) == sha256:
                return local
            os.remove(local)  # a corrupt or replaced copy: fetch once more
        raise ValueError(f"{redact_url(url)} does not have the sha256 {sha256[:12]}... the job started with "
                         "(was it replaced during the run?)")

