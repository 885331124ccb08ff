"""The token dataset on storage (DESIGN §2.2): staged pieces, finished shards, markers, manifest.

Layout under DST (everything but the part files and the manifest is hidden from Parquet readers by
its leading underscore):

    part-<shard id>.parquet          token rows of one input shard, sorted by position in the shard
    _errors/part-<shard id>.parquet  error rows of that shard
    _manifest.json                   written last, when every shard of the input is done
    _state/run.json                  the settings the tokens depend on (a re-run must match them)
    _state/done/<shard id>.json      completion marker: counts, histogram, files, input fingerprint
    _state/staging/<shard id>/*.parquet   pieces written by the write stage, merged at completion

Exactly once: pieces are named by the sample indices they hold, so a retried task rewrites the same
piece; a shard is merged only when its indices 0..total-1 are all staged, duplicates dropped; its
marker is written after its files. Nothing half-written is visible: local files are written under a
hidden temporary name then renamed, object stores get one atomic PUT per file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipelines.retry import RetryPolicy, call_with_retries
from pipelines.schema import (
    ADAPTIVE_ENCODED_SCHEMA,
    ENCODED_SCHEMA,
    PIECE_SCHEMA,
    encoded_schema,
    error_kind,
    error_rows,
    read_file_metadata,
    token_rows,
)
from pipelines.sources import Shard, filesystem

log = logging.getLogger(__name__)

ERRORS_DIR = "_errors"
MANIFEST = "_manifest.json"
STATE_DIR = "_state"
RUN_FILE = f"{STATE_DIR}/run.json"
DONE_DIR = f"{STATE_DIR}/done"
STAGING_DIR = f"{STATE_DIR}/staging"


class IncompleteShardError(RuntimeError):
    """A shard's staged rows do not cover 0..total-1 (a bug or lost work; a re-run redoes it)."""


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes (same table -> same bytes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _local_temporary(path: str, data: bytes) -> str:
    """`data` in a new temporary file beside `path` (to be renamed or linked there). A write that fails
    (disk full) leaves no temporary behind and names `path`, which write() errors do not."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.filename is None and e.strerror:
            raise OutputWriteError(f"{e.strerror}: {path}") from e
        raise
    return tmp


def _already_exists(error: BaseException) -> bool:
    """A conditional create refused because the object exists, as a store's client reports it: GCS's
    412 Precondition Failed (gcsfs HttpError.code), Azure's 409 ResourceExistsError (adlfs)."""
    if type(error).__name__ == "ResourceExistsError":
        return True
    return any(getattr(error, name, None) == 412 for name in ("code", "status_code", "status"))


class OutputWriteError(OSError):
    """A file that could not be written (disk full), as one line with the cause and the path. The
    message is its only argument: Ray Data rewrites an OSError's (errno, strerror) arguments on the
    way to the driver and the file name is lost."""


class OutputStore:
    """DST on any fsspec filesystem, with atomic whole-file writes. Every call is retried through
    transient storage faults (`pipelines.retry`); all of them are idempotent (whole-file PUTs)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 retry_policy: RetryPolicy | None = None):
        self.url = url.rstrip("/")
        self.fs, root = filesystem(self.url, storage_options)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.retry_policy = retry_policy or RetryPolicy()

    def _retried(self, what: str, fn, *args, **kwargs):
        return call_with_retries(lambda: fn(*args, **kwargs), policy=self.retry_policy, what=what)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        if self.is_local:
            os.replace(_local_temporary(path, data), path)
        else:  # one PUT: the object appears whole or not at all
            self._retried(f"writing {rel}", self.fs.pipe_file, path, data)

    def create(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist (atomically where the storage can); True if written."""
        path = self.path(rel)
        try:
            if self.is_local:  # whole content under a temporary name, then a link that fails if taken
                tmp = _local_temporary(path, data)
                try:
                    os.link(tmp, path)
                finally:
                    os.unlink(tmp)
                return True
            protocols = set(self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
            if protocols & {"s3", "s3a", "gs", "gcs"}:
                # s3fs: a conditional PUT (If-None-Match: *); gcsfs: an upload with ifGenerationMatch=0
                self.fs.pipe_file(path, data, mode="create")
                return True
            if protocols & {"abfs", "abfss", "az"}:
                self.fs.pipe_file(path, data, overwrite=False)  # adlfs: upload_blob(overwrite=False), If-None-Match: *
                return True
        except FileExistsError:
            return False
        except Exception as e:
            if _already_exists(e):
                return False
            raise
        if self.fs.exists(path):  # other stores (HTTP, FTP, ...): check then write, not atomic
            return False
        self.fs.pipe_file(path, data)
        return True

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_bytes(self, rel: str) -> bytes:
        return self._retried(f"reading {rel}", self.fs.cat_file, self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def exists(self, rel: str) -> bool:
        return self._retried(f"looking for {rel}", self.fs.exists, self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names of visible files directly in `rel` (none if it does not exist)."""
        try:
            entries = self._retried(f"listing {rel or '.'}", self.fs.ls, self.path(rel), detail=True)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "directory"]
        return sorted(n for n in names if not n.startswith("."))

    def rm(self, rel: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._retried(f"removing {rel}", self.fs.rm, self.path(rel), recursive=recursive)

    def invalidate(self) -> None:
        self.fs.invalidate_cache()


# Staging: the write stage -------------------------------------------------------------------------
def piece_name(indices: np.ndarray) -> str:
    """Named by the indices it holds: the same rows always land in the same file."""
    digest = hashlib.sha1(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]
    return f"{int(indices.min()):09d}-{int(indices.max()):09d}-{digest}.parquet"


def write_pieces(batch: pa.Table, store: OutputStore) -> pa.Table:
    """Stage the rows of an ENCODED_SCHEMA (or ADAPTIVE_ENCODED_SCHEMA) batch, one piece per shard;
    report them (PIECE_SCHEMA)."""
    schema = ADAPTIVE_ENCODED_SCHEMA if "candidate_mse" in batch.column_names else ENCODED_SCHEMA
    shards = batch.column("shard").to_numpy(zero_copy_only=False)
    index = batch.column("index").to_numpy()
    totals = batch.column("total").to_numpy()
    has_error = pc.is_valid(batch.column("error")).to_numpy(zero_copy_only=False)
    records: dict[str, list] = {name: [] for name in PIECE_SCHEMA.names}
    for shard_id in sorted(set(shards.tolist())):
        mask = shards == shard_id
        rows = mask & (index >= 0)
        ends = mask & (index < 0)
        piece = None
        if rows.any():
            table = batch.filter(pa.array(rows)).sort_by("index")
            indices = table.column("index").to_numpy()
            piece = piece_name(indices)
            store.write_bytes(f"{STAGING_DIR}/{shard_id}/{piece}", parquet_bytes(table.select(schema.names)))
        records["shard"].append(shard_id)
        records["piece"].append(piece)
        records["indices"].append(index[rows].tolist())
        records["total"].append(int(totals[ends].max()) if ends.any() else -1)
        records["num_rows"].append(int((rows & ~has_error).sum()))
        records["num_errors"].append(int((rows & has_error).sum()))
        ends_at = np.flatnonzero(ends)
        records["retries"].append(sum(int(r or 0) for r in batch.column("retries").take(ends_at).to_pylist()))
        failures = [e for e in batch.column("error").take(ends_at).to_pylist() if e]
        records["failure"].append(failures[0] if failures else None)
    return pa.Table.from_pydict(records, schema=PIECE_SCHEMA)


def write_pieces_batch(batch: pa.Table, *, output: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Ray Data write stage (stateless): ENCODED_SCHEMA -> PIECE_SCHEMA records for the driver."""
    return write_pieces(batch, OutputStore(output, storage_options))


def _staged_tables(
    store: OutputStore, shard_id: str, columns: list[str] | None = None, schema: pa.Schema = ENCODED_SCHEMA,
) -> list[pa.Table]:
    """The readable staged pieces of a shard; a torn or corrupt piece is removed (its rows are redone)."""
    tables = []
    for name in store.listdir(f"{STAGING_DIR}/{shard_id}"):
        if not name.endswith(".parquet"):
            continue
        rel = f"{STAGING_DIR}/{shard_id}/{name}"
        try:
            tables.append(pq.read_table(io.BytesIO(store.read_bytes(rel)), columns=columns,
                                        schema=None if columns else schema))
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            log.warning("staged piece %s is unreadable (%s): removed, its samples are redone", rel, e)
            store.rm(rel)
    return tables


def staged_shard_ids(store: OutputStore) -> set[str]:
    """Shards with staged pieces (one recursive listing of the staging folder)."""
    root = store.path(STAGING_DIR)
    try:
        found = store._retried("listing staged pieces", store.fs.find, root)
    except FileNotFoundError:
        return set()
    return {posixpath.relpath(p, root).split("/", 1)[0] for p in found if p.endswith(".parquet")}


def staged_indices(store: OutputStore, shard_id: str) -> set[int]:
    """Indices already staged for a shard by an earlier, interrupted run."""
    done: set[int] = set()
    for table in _staged_tables(store, shard_id, columns=["index"]):
        done.update(table.column("index").to_pylist())
    return done


# Completion ---------------------------------------------------------------------------------------
def merge_staged(store: OutputStore, shard_id: str, total: int, *, adaptive: bool = False) -> pa.Table:
    """All staged rows of a shard, sorted by index, each index once; raises if any is missing."""
    schema = encoded_schema(adaptive)
    tables = _staged_tables(store, shard_id, schema=schema)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    table = table.sort_by("index")
    index = table.column("index").to_numpy()
    if len(index):
        first = np.concatenate([[True], index[1:] != index[:-1]])  # drop duplicates from retried tasks
        table, index = table.filter(pa.array(first)), index[first]
    if len(index) != total or (total and (index[0] != 0 or index[-1] != total - 1)):
        raise IncompleteShardError(f"shard {shard_id}: staged {len(index)} of {total} samples")
    return table


def finalize_shard(
    store: OutputStore, shard: Shard, total: int, metadata: Mapping[bytes, bytes], *, retries: int = 0,
) -> dict[str, Any]:
    """Merge a complete shard into its part files, then write its marker, then drop its staging.
    `retries`: storage faults its reader retried in the run that completed it (for the manifest)."""
    length_target = read_file_metadata(pa.schema([], metadata=dict(metadata))).get("length_target")
    table = merge_staged(store, shard.id, total, adaptive=length_target is not None)
    tokens = token_rows(table, adaptive=length_target is not None).replace_schema_metadata(dict(metadata))
    errors = error_rows(table)
    files = []
    for rel, rows in ((part_name(shard.id), tokens), (f"{ERRORS_DIR}/{part_name(shard.id)}", errors)):
        if rows.num_rows:
            store.write_bytes(rel, parquet_bytes(rows))
            files.append(rel)
        else:
            store.rm(rel)
    lengths = Counter(tokens.column("num_tokens").to_pylist())
    messages = errors.column("error").to_pylist()
    marker = {
        "shard": shard.id,
        "source": shard.source,
        "fingerprint": shard.fingerprint,
        "inputs": total,
        "rows": tokens.num_rows,
        "errors": errors.num_rows,
        "errors_by_kind": dict(Counter(error_kind(m) for m in messages)),
        "errors_by_stage": dict(Counter(errors.column("stage").to_pylist())),
        "token_length_histogram": {str(k): v for k, v in sorted(lengths.items())},
        "files": files,
        "retries": retries,
    }
    if length_target is not None:
        marker["adaptive"] = adaptive_summary(table, tokens, length_target)
    assert marker["rows"] + marker["errors"] == total, f"shard {shard.id}: rows + errors != inputs"
    store.write_json(f"{DONE_DIR}/{shard.id}.json", marker)
    store.rm(f"{STAGING_DIR}/{shard.id}", recursive=True)
    return marker


def adaptive_summary(encoded: pa.Table, tokens: pa.Table, length_target: Mapping[str, Any]) -> dict[str, Any]:
    """What a shard adds to the manifest's adaptive-length summary: the chosen-length histogram, the
    summed MSE at every candidate length (mean error vs length over the corpus), the summed MSE of the
    chosen prefixes and of all K tokens, and the rows that missed an absolute target even at K."""
    ok = encoded.filter(pc.is_null(encoded["error"]))
    chosen = tokens.column("chosen_num_tokens").to_numpy()
    mse = tokens.column("reconstruction_mse").to_numpy().astype(np.float64)
    candidate = ok.column("candidate_mse")
    num_candidates = len(candidate[0]) if len(candidate) else 0
    sums = (np.asarray(pc.list_flatten(candidate).to_numpy(), np.float64).reshape(-1, num_candidates).sum(0)
            if num_candidates else np.zeros(0))
    bound = length_target.get("max_error")
    return {
        "chosen_length_histogram": {str(k): v for k, v in sorted(Counter(chosen.tolist()).items())},
        "candidate_mse_sum": [float(x) for x in sums],
        "chosen_mse_sum": float(mse.sum()),
        "full_mse_sum": float(tokens.column("full_reconstruction_mse").to_numpy().astype(np.float64).sum()),
        "tokens_sum": int(chosen.sum()),
        "rows_missing_target": int((mse > bound).sum()) if bound is not None else 0,
    }


def finalize_shard_task(
    output: str, storage_options: Mapping[str, Any] | None, shard_json: str, total: int,
    metadata: Mapping[bytes, bytes], retries: int = 0,
) -> dict[str, Any]:
    """`finalize_shard` with plain arguments, for a remote task."""
    return finalize_shard(OutputStore(output, storage_options), Shard.from_json(shard_json), total, metadata,
                          retries=retries)


def load_markers(store: OutputStore) -> dict[str, dict[str, Any]]:
    """Completion markers by shard id (fetched concurrently on object stores)."""
    paths = [store.path(f"{DONE_DIR}/{n}") for n in store.listdir(DONE_DIR) if n.endswith(".json")]
    contents = store._retried("reading done markers", store.fs.cat, paths) if paths else {}
    markers = {}
    for path, data in contents.items():
        try:
            marker = json.loads(data)
            markers[marker["shard"]] = marker
        except (ValueError, KeyError, TypeError):  # torn or edited: the shard is redone, its files replaced
            log.warning("completion marker %s is unreadable: its shard will be redone", path)
            name = posixpath.basename(path)[: -len(".json")]
            markers[name] = {"shard": name, "fingerprint": None}
    return markers


def clear_unfinished(store: OutputStore, shard_id: str) -> None:
    """Remove part files of a shard that has no valid marker (left by a killed merge or old input)."""
    store.rm(part_name(shard_id))
    store.rm(f"{ERRORS_DIR}/{part_name(shard_id)}")
    store.rm(f"{DONE_DIR}/{shard_id}.json")


def vanished_shards(store: OutputStore, shard_ids: set[str], markers: Mapping[str, Any]) -> list[str]:
    """Shards with output in DST (a marker or a part file) that the input no longer has."""
    found = set(markers)
    for folder in ("", ERRORS_DIR):
        for name in store.listdir(folder):
            if name.startswith("part-") and name.endswith(".parquet"):
                found.add(name[len("part-") : -len(".parquet")])
    return sorted(found - shard_ids)


# Totals -------------------------------------------------------------------------------------------
def aggregate(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Dataset-wide counts from shard markers."""
    kinds: Counter = Counter()
    stages: Counter = Counter()
    lengths: Counter = Counter()
    for m in markers:
        kinds.update(m["errors_by_kind"])
        stages.update(m["errors_by_stage"])
        lengths.update({int(k): v for k, v in m["token_length_histogram"].items()})
    counts = {
        "inputs": sum(m["inputs"] for m in markers),
        "rows": sum(m["rows"] for m in markers),
        "errors": sum(m["errors"] for m in markers),
        "io_retries": sum(m.get("retries", 0) for m in markers),  # storage faults retried, not data
        "errors_by_kind": dict(kinds.most_common()),
        "errors_by_stage": dict(sorted(stages.items())),
    }
    out = {"counts": counts, "token_length_histogram": {str(k): v for k, v in sorted(lengths.items())}}
    adaptive = [m["adaptive"] for m in markers if "adaptive" in m]
    if adaptive:
        out["adaptive_totals"] = aggregate_adaptive(adaptive)
    return out


def aggregate_adaptive(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum shards' `adaptive_summary`s (the manifest turns the sums into means)."""
    chosen: Counter = Counter()
    for p in parts:
        chosen.update({int(k): v for k, v in p["chosen_length_histogram"].items()})
    widths = {len(p["candidate_mse_sum"]) for p in parts if p["candidate_mse_sum"]}
    assert len(widths) <= 1, "shards measured different candidate lengths"
    width = widths.pop() if widths else 0
    candidate = np.zeros(width)
    for p in parts:
        if p["candidate_mse_sum"]:
            candidate += np.asarray(p["candidate_mse_sum"])
    return {
        "chosen_length_histogram": {str(k): v for k, v in sorted(chosen.items())},
        "candidate_mse_sum": [float(x) for x in candidate],
        **{k: sum(p[k] for p in parts) for k in ("chosen_mse_sum", "full_mse_sum", "tokens_sum", "rows_missing_target")},
    }
