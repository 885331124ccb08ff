"""The tokenization pipeline: image corpus -> token dataset (DESIGN §2.2, §5), with Ray Data.

    shards (from_items) -> read + decode (CPU tasks, fused) -> TokenizeBatch (actor pool)
      -> write pieces (CPU tasks) -> driver: per-shard bookkeeping -> finalize (remote tasks)

Owns: the job config, sizing the actor pool so decoding always has CPU, the driver loop that knows
when a shard is complete, resume (skip finished shards, skip staged rows of unfinished ones), the
manifest and the one-screen summary. Stage functions live in `sources`, `decode`, `encode`, `writer`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from flextok.precision import check_precision
from pipelines import writer
from pipelines.cluster import check_ray_address, ensure_ray
from pipelines.decode import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, decode_batch
from pipelines.encode import TokenizeBatch
from pipelines.lease import Lease
from pipelines.model import (
    TokenizerInfo,
    inspect_model,
    is_remote,
    model_identity,
    resolve_model_spec,
)
from pipelines.report import build_manifest, summary_text
from pipelines.retry import RetryPolicy, StorageUnavailableError, call_with_retries, describe
from pipelines.schema import SCHEMA_VERSION, file_metadata
from pipelines.sources import InputPlan, read_shard_batch, resolve_inputs
from pipelines.storage import effective_storage_options, preflight, redact_url
from pipelines.writer import OutputStore

log = logging.getLogger(__name__)

# Settings the stored tokens depend on; a re-run on the same DST must not change them.
TOKEN_SETTINGS = ("schema_version", "checkpoint_id", "checkpoint_sha256", "max_tokens", "image_size",
                  "max_pixels", "min_side", "files_per_shard", "precision", "gpu_decode", "length_target")
# Those of them that come straight from the job config (checked before the model is even opened).
_CFG_TOKEN_SETTINGS = ("max_pixels", "min_side", "files_per_shard", "precision", "gpu_decode")
# What outputs written before a setting was recorded used: every earlier run decoded with Pillow and
# encoded in fp32 (the CUDA path, bf16, never ran before precision was recorded).
_UNRECORDED_SETTINGS = {"precision": "fp32", "gpu_decode": False}


def _recorded(before: Mapping[str, Any], key: str) -> Any:
    return before.get(key, _UNRECORDED_SETTINGS.get(key))


class IncompleteRunError(RuntimeError):
    """The pipeline ended with shards unfinished; re-running the same command finishes them."""


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """One tokenization job. `storage_options` may hold secrets: it is never logged or stored."""

    input: str
    output: str
    model: str | None = None
    max_tokens: int | None = None
    batch_size: int = 64
    num_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    files_per_shard: int = 1000
    read_batch_rows: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    precision: str = "fp32"
    compile: bool = False
    gpu_decode: bool = False
    device: str | None = None  # None: CUDA on GPU actors (required), CPU otherwise; "cpu" forces CPU
    io_attempts: int = 8  # tries per storage operation before a shard is left unfinished
    io_retry_delay_s: float = 1.0  # first backoff; doubles per retry, jittered, capped at 30 s
    length_target: Any = None  # a flextok.adaptive.LengthTarget: adaptive length per image
    keep_all_tokens: bool = False  # with length_target: store all K tokens, record the chosen length

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.length_target is not None and self.max_tokens is not None:
            raise ValueError("--max-tokens and an adaptive length target exclude each other")
        if self.keep_all_tokens and self.length_target is None:
            raise ValueError("keeping all tokens with a chosen length needs an adaptive length target")
        for name in ("batch_size", "files_per_shard", "read_batch_rows", "max_pixels", "min_side", "io_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_tokens", "num_actors"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if not self.input or not self.output:
            raise ValueError("input and output must be given")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.io_retry_delay_s < 0:
            raise ValueError(f"io_retry_delay_s must be >= 0, got {self.io_retry_delay_s}")

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.io_attempts, base_delay_s=self.io_retry_delay_s,
                           max_delay_s=max(30.0, self.io_retry_delay_s))


@dataclass(frozen=True)
class ActorPlan:
    """The encoder pool: between `min_actors` and `num_actors` (the most the job wants) actors."""

    num_actors: int
    cpus_per_actor: float  # what each actor reserves from Ray's scheduler
    gpus_per_actor: float
    num_threads: int  # torch CPU threads per actor
    min_actors: int | None = None  # None: a fixed pool of num_actors

    @property
    def smallest(self) -> int:
        return self.num_actors if self.min_actors is None else self.min_actors

    @property
    def autoscales(self) -> bool:
        return self.smallest < self.num_actors


def plan_actors(
    cluster_cpus: float, cluster_gpus: float, *, largest_node_cpus: float | None = None,
    num_actors: int | None = None, cpus_per_actor: float | None = None, gpus_per_actor: float | None = None,
) -> ActorPlan:
    """Size the encoder pool: one actor per GPU, or on CPU-only clusters one encoder thread per CPU.

    GPU pools describe what the job wants, not what is up now: `--actors N` with fewer GPUs up
    (an autoscaling cluster that starts with no GPU node) gives a pool that starts with the actors
    the GPUs up can hold (at least one, which waits for the first GPU node) and grows to N as GPU
    nodes join; the pending actors are the demand the Ray autoscaler launches nodes for. With all
    the GPUs there, or without `--actors`, the pool is fixed (one actor per GPU up).

    CPU pools: encoding and read/decode share the cores, in a ratio that depends on the corpus (a
    28 px PNG decodes in a fraction of its encoding time, a 500x375 JPEG in a third of it) and
    changes during a run (decoding of a small corpus ends long before encoding). So each stage
    gets enough runnable threads to fill every core alone, and the OS shares the cores between
    the stages that have work: one single-thread actor per CPU (separate processes scale better on
    CPU than intra-op threads, which wait on each other at every op), while the pool reserves from
    Ray's scheduler at most half the CPUs, leaving the other half as read/decode task slots. A stage
    with nothing to do (decoding finished or back-pressured, or encoders waiting for input) sleeps
    and the other takes its cores: no fixed split leaves a core idle.
    Read/decode tasks must always find a CPU: a pool holding every CPU starves them and the job
    hangs. Ray restarts the actors of a lost node elsewhere, so the pool also reserves at most what
    the cluster keeps after losing its largest node, minus one CPU (down to nothing on 1-CPU nodes).
    An explicit `cpus_per_actor` is reserved as given, for ceil(cpus_per_actor) threads per actor
    and, unless `--actors` says otherwise, actors on half the CPUs.
    """
    threads = max(1, math.ceil(cpus_per_actor or 1.0))
    if gpus_per_actor or (cluster_gpus > 0 and gpus_per_actor != 0):
        gpus = gpus_per_actor or 1.0
        up = int(cluster_gpus / gpus + 1e-9)  # actors the GPUs up now can hold
        wanted = num_actors or max(1, up)
        if up >= wanted:  # everything is there: a fixed pool, checked against the CPUs up
            return _fixed_plan(cluster_cpus, largest_node_cpus, wanted, cpus_per_actor, gpus, threads)
        # GPU nodes bring their own CPUs: the CPUs up now say nothing about them.
        return ActorPlan(wanted, round(cpus_per_actor or 1.0, 3), gpus, threads, min_actors=max(1, up))
    if num_actors is None:
        share = 1 if cpus_per_actor is None else 2  # one thread per CPU; an explicit reservation: half the CPUs
        num_actors = max(1, int(cluster_cpus / share // threads))
    return _fixed_plan(cluster_cpus, largest_node_cpus, num_actors, cpus_per_actor, 0.0, threads)


def _fixed_plan(cluster_cpus: float, largest_node_cpus: float | None, actors: int, cpus_per_actor: float | None,
                gpus: float, threads: int) -> ActorPlan:
    if cpus_per_actor is not None:
        cpus = cpus_per_actor
    else:
        multi_node = largest_node_cpus is not None and largest_node_cpus < cluster_cpus
        survivable = cluster_cpus - largest_node_cpus if multi_node else cluster_cpus
        if gpus:  # a GPU actor's thread feeds its GPU: one CPU where the cluster has it
            cpus = min(float(threads), max(0.1, (survivable - 1) / actors))
        else:  # CPU encoders: half the CPUs at most, the other half are decode task slots
            pool = max(0.0, min(cluster_cpus / 2, survivable - 1))
            cpus = min(float(threads), math.floor(pool / actors * 1e4) / 1e4)  # Ray's resolution: 1e-4
    if actors * cpus > cluster_cpus - 1 + 1e-9:
        raise ValueError(
            f"--actors {actors} x {cpus:g} CPUs leaves no CPU for reading and decoding on a cluster of "
            f"{cluster_cpus:g} CPUs; use fewer actors or --cpus-per-actor below 1"
        )
    return ActorPlan(actors, round(cpus, 4), gpus, threads)


@dataclass
class TokenizeResult:
    output: str
    manifest: dict[str, Any]
    nothing_to_do: bool = False
    stats: str = ""  # Ray Data's execution statistics of this run (operators, times, rows)

    def summary(self) -> str:
        return summary_text(self.manifest, nothing_to_do=self.nothing_to_do)


def _check_layout(plan: InputPlan, store: OutputStore) -> None:
    """The output must not lie inside an input folder, nor an input inside the output (a re-run would
    read its own output). Local paths are compared where they resolve, through any symlink."""
    out = store.fs.unstrip_protocol(store.root).rstrip("/") + "/"
    roots = {s.url if s.format == "images" else s.url.rsplit("/", 1)[0] for s in plan.shards}
    inside = any(out.startswith(root.rstrip("/") + "/") for root in roots)
    if not inside and store.is_local and all(s.url.startswith("file://") or "://" not in s.url for s in plan.shards):
        real_out = os.path.realpath(store.root).rstrip(os.sep) + os.sep
        local_roots = {os.path.realpath(store.fs._strip_protocol(r)) for r in roots}
        inputs = {os.path.realpath(store.fs._strip_protocol(u)) for s in plan.shards for u in (s.files or (s.url,))}
        inside = any(real_out.startswith(r.rstrip(os.sep) + os.sep) for r in local_roots) or any(
            p.startswith(real_out) for p in inputs)
    if inside:
        raise ValueError(f"--output {redact_url(store.url)} lies inside the input folder, or an input inside "
                         "it (through a symlink); choose another folder")


def _token_settings(info: TokenizerInfo, cfg: TokenizeConfig, max_tokens: int, plan: InputPlan) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "input": redact_url(cfg.input),
        "format": plan.format,
        "checkpoint_id": info.checkpoint_id,
        "checkpoint_sha256": info.checkpoint_sha256,
        "max_tokens": max_tokens,
        "image_size": info.image_size,
        "max_pixels": cfg.max_pixels,
        "min_side": cfg.min_side,
        "files_per_shard": cfg.files_per_shard,
        "precision": cfg.precision,
        "gpu_decode": cfg.gpu_decode,
        "length_target": _length_settings(cfg, info),
    }


def _length_settings(cfg: TokenizeConfig, info: TokenizerInfo) -> dict[str, Any] | None:
    """An adaptive run's target as recorded (settings, file metadata, manifest); None for plain runs."""
    if cfg.length_target is None:
        return None
    return {**cfg.length_target.describe(), "keep_all_tokens": cfg.keep_all_tokens,
            "candidate_lengths": list(cfg.length_target.lengths(info.num_registers))}


def _same_length_target(before: Mapping[str, Any], cfg: TokenizeConfig) -> bool:
    """Whether a finished DST was made with the length target `cfg` asks for (or both without one)."""
    recorded = before.get("length_target")
    if cfg.length_target is None or recorded is None:
        return cfg.length_target is None and recorded is None
    asked = {**cfg.length_target.describe(), "keep_all_tokens": cfg.keep_all_tokens}
    return all(recorded.get(k) == v for k, v in asked.items())


def _same_model(before: Mapping[str, Any], checkpoint_id: str, sha256: str | None) -> bool:
    """Same weights: equal sha256 when there is a file (its path may differ), else the same preset."""
    if sha256 or before.get("checkpoint_sha256"):
        return before.get("checkpoint_sha256") == sha256
    return before.get("checkpoint_id") == checkpoint_id


def _check_settings(store: OutputStore, settings: dict) -> None:
    if not store.exists(writer.RUN_FILE):
        return
    before = store.read_json(writer.RUN_FILE)
    if not _same_model(before, settings["checkpoint_id"], settings["checkpoint_sha256"]):
        changed = ["checkpoint_sha256" if settings["checkpoint_sha256"] else "checkpoint_id"]
    else:
        changed = [k for k in TOKEN_SETTINGS if k not in ("checkpoint_id", "checkpoint_sha256")
                   and _recorded(before, k) != settings.get(k)]
    if changed:
        k = changed[0]
        raise ValueError(
            f"{redact_url(store.url)} holds tokens made with {k}={_recorded(before, k)!r}, not {settings.get(k)!r}; "
            "use a new --output or delete the old one"
        )


def run_tokenize(cfg: TokenizeConfig, *, encoder_cls: type = TokenizeBatch) -> TokenizeResult:
    """Tokenize `cfg.input` into `cfg.output`, resuming whatever an earlier run left unfinished."""
    wall_start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    opts_in = effective_storage_options(cfg.input, cfg.storage_options)
    opts_out = effective_storage_options(cfg.output, cfg.storage_options)
    check_ray_address()
    preflight(cfg.input, opts_in)
    preflight(cfg.output, opts_out)
    plan = call_with_retries(lambda: resolve_inputs(cfg.input, opts_in, files_per_shard=cfg.files_per_shard),
                             policy=cfg.retry_policy, what=f"listing {redact_url(cfg.input)}")
    store = OutputStore(cfg.output, opts_out, cfg.retry_policy)
    if store.fs.isfile(store.root):
        raise ValueError(f"--output {redact_url(cfg.output)} is a file; name a folder (new or from an earlier run)")
    _check_layout(plan, store)
    # A relative checkpoint path stays relative on a cluster (`ray job submit --working-dir`).
    spec = resolve_model_spec(cfg.model, keep_relative=bool(os.environ.get("RAY_ADDRESS")))
    opts_model = effective_storage_options(spec, cfg.storage_options) if is_remote(spec) else {}
    markers = writer.load_markers(store)
    done = {s.id for s in plan.shards if markers.get(s.id, {}).get("fingerprint") == s.fingerprint}
    pending = [s for s in plan.shards if s.id not in done]
    vanished = writer.vanished_shards(store, {s.id for s in plan.shards}, markers)
    if not pending and not vanished and store.exists(writer.MANIFEST) and store.exists(writer.RUN_FILE):
        before = store.read_json(writer.RUN_FILE)
        same = _same_model(before, *model_identity(spec, opts_model)) and cfg.max_tokens in (None, before.get("max_tokens"))
        if same and _same_length_target(before, cfg) and all(
                _recorded(before, k) == getattr(cfg, k) for k in _CFG_TOKEN_SETTINGS):
            log.info("nothing to do: %s is complete (%d shards)", redact_url(cfg.output), len(plan.shards))
            return TokenizeResult(cfg.output, store.read_json(writer.MANIFEST), nothing_to_do=True)

    info = inspect_model(spec, opts_model)
    max_tokens = cfg.max_tokens or info.num_registers
    if max_tokens > info.num_registers:
        raise ValueError(f"--max-tokens {max_tokens} exceeds the model's {info.num_registers} tokens")
    settings = _token_settings(info, cfg, max_tokens, plan)
    _check_settings(store, settings)
    with Lease(store):
        return _run_locked(cfg, plan, store, spec, info, max_tokens, settings, encoder_cls, opts_in, opts_out,
                           started, wall_start)


def _run_locked(
    cfg: TokenizeConfig, plan: InputPlan, store: OutputStore, spec: str, info: TokenizerInfo, max_tokens: int,
    settings: dict, encoder_cls: type, opts_in: dict, opts_out: dict, started: str, wall_start: float,
) -> TokenizeResult:
    """Everything that writes to DST, under its lease (markers are read again: they may have moved on)."""
    store.invalidate()
    markers = writer.load_markers(store)
    done = {s.id for s in plan.shards if markers.get(s.id, {}).get("fingerprint") == s.fingerprint}
    pending = [s for s in plan.shards if s.id not in done]
    vanished = writer.vanished_shards(store, {s.id for s in plan.shards}, markers)
    if vanished:  # their rows would stay beside the new ones: duplicates, or samples no longer in the input
        log.warning("removing the output of %d shards no longer in the input: %s", len(vanished),
                    ", ".join(vanished[:5]))
        for sid in vanished:
            writer.clear_unfinished(store, sid)
            markers.pop(sid, None)
    started_ray = ensure_ray()

    # Two listings tell which pending shards left files behind, instead of 3 requests per shard.
    leftovers = set(store.listdir("")) | {f"{writer.ERRORS_DIR}/{n}" for n in store.listdir(writer.ERRORS_DIR)}
    staged = writer.staged_shard_ids(store)
    skip: dict[str, set[int]] = {}
    for shard in pending:
        if shard.id in markers:  # its input changed since it was done: redo it from scratch
            writer.clear_unfinished(store, shard.id)
            store.rm(f"{writer.STAGING_DIR}/{shard.id}", recursive=True)
            staged.discard(shard.id)
        else:  # possibly left by a killed run: part files go, staged rows are kept and skipped
            for rel in (writer.part_name(shard.id), f"{writer.ERRORS_DIR}/{writer.part_name(shard.id)}"):
                if rel in leftovers:
                    store.rm(rel)
        skip[shard.id] = writer.staged_indices(store, shard.id) if shard.id in staged else set()
    if not store.exists(writer.RUN_FILE):
        store.write_json(writer.RUN_FILE, settings)
    store.rm(writer.MANIFEST)  # written again at the end: until then DST does not claim to be complete
    resumed_rows = sum(len(v) for v in skip.values())
    log.info(
        "%s: %d shards (%s), %d already done, %d to do%s", redact_url(cfg.input), len(plan.shards), plan.format,
        len(done), len(pending), f", {resumed_rows} samples already staged" if resumed_rows else "",
    )

    meta = file_metadata(
        checkpoint_id=info.checkpoint_id, checkpoint_sha256=info.checkpoint_sha256,
        codebook_size=info.codebook_size, fsq_levels=info.fsq_levels, max_tokens=max_tokens,
        image_size=info.image_size, class_names=plan.class_names, precision=cfg.precision,
        length_target=settings["length_target"],
    )
    run, stats = _execute(cfg, pending, skip, spec, info, max_tokens, meta, opts_in, opts_out, encoder_cls, markers)
    store.rm(writer.STAGING_DIR, recursive=True)
    final_markers = [markers[s.id] for s in plan.shards]
    run.update(started=started, wall_time_s=round(time.perf_counter() - wall_start, 3), started_ray=started_ray,
               shards_already_done=len(done))
    # Through JSON so the returned manifest equals what a reader of _manifest.json gets.
    manifest = build_manifest(cfg, plan, info, max_tokens, final_markers, run, opts_in, settings["length_target"])
    if "adaptive" in manifest:
        manifest["adaptive"]["examples"] = _write_examples(store, spec, final_markers)
    manifest = json.loads(json.dumps(manifest))
    store.write_json(writer.MANIFEST, manifest)
    return TokenizeResult(cfg.output, manifest, stats=stats)


def _write_examples(store: OutputStore, spec: str, markers: list[dict]) -> str | None:
    """DST/_adaptive_examples.png: rows of the first shard with rows, at their chosen lengths."""
    import io

    import pyarrow.parquet as pq

    from pipelines.model import load_model
    from pipelines.report import EXAMPLES_PICTURE, adaptive_examples

    files = [f for m in markers for f in m["files"] if not f.startswith(writer.ERRORS_DIR)]
    if not files:
        return None
    table = pq.read_table(io.BytesIO(store.read_bytes(files[0])), columns=["tokens", "chosen_num_tokens"])
    table = table.slice(0, 512)
    picture = adaptive_examples(load_model(spec, device="cpu"), table.column("tokens").to_pylist(),
                                table.column("chosen_num_tokens").to_pylist())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    store.write_bytes(EXAMPLES_PICTURE, buffer.getvalue())
    return EXAMPLES_PICTURE


class ShardTracker:
    """Driver-side exactly-once bookkeeping: which indices of which shard are staged, and when a
    shard is complete (every index 0..total-1 seen; duplicates from retried tasks count once).
    Index sets are kept only while a shard is in flight, so memory follows the shards in flight."""

    def __init__(self, staged: Mapping[str, set[int]]):
        self.seen = {sid: set(indices) for sid, indices in staged.items()}
        self.already = sum(len(v) for v in staged.values())
        self.totals: dict[str, int] = {}
        self.completed: list[str] = []
        self.done_counts: dict[str, int] = {}
        self.retries: dict[str, int] = {}  # storage faults retried by each shard's reader, this run
        self.failures: dict[str, str] = {}  # shards whose reader gave up (storage unavailable), and why

    def update(self, record: Mapping[str, Any]) -> bool:
        """Take one write-stage record; True when this record completes its shard."""
        sid = record["shard"]
        if sid not in self.seen:
            raise AssertionError(f"record for unknown shard {sid}")
        if sid in self.done_counts:
            return False  # a late duplicate of a finished shard
        self.seen[sid].update(record["indices"])
        if record.get("retries"):
            self.retries[sid] = self.retries.get(sid, 0) + record["retries"]
        if record.get("failure"):
            self.failures[sid] = record["failure"]
        if record["total"] >= 0:
            self.totals[sid] = record["total"]
        if sid in self.totals and len(self.seen[sid]) >= self.totals[sid]:
            assert max(self.seen[sid], default=-1) < self.totals[sid], f"shard {sid}: index beyond its total"
            self.completed.append(sid)
            self.failures.pop(sid, None)  # a re-executed read task got through after all
            self.done_counts[sid] = len(self.seen[sid])
            self.seen[sid] = set()
            return True
        return False

    @property
    def processed(self) -> int:
        """Distinct samples staged by this run."""
        in_flight = sum(len(v) for sid, v in self.seen.items() if sid not in self.done_counts)
        return sum(self.done_counts.values()) + in_flight - self.already

    def unfinished(self) -> list[str]:
        return [sid for sid in self.seen if sid not in self.done_counts]

    def describe(self, sid: str) -> str:
        why = f": {self.failures[sid]}" if sid in self.failures else ""
        return f"{sid} ({len(self.seen[sid])}/{self.totals.get(sid, '?')}){why}"


def _device_kwargs(cfg: TokenizeConfig, actors: ActorPlan) -> dict[str, str]:
    """A GPU actor computes on CUDA, and fails if it has none, unless the user asked for CPU."""
    if cfg.device is not None:
        return {"device": cfg.device}
    return {"device": "cuda"} if actors.gpus_per_actor else {}


def _remote_model_kwargs(spec: str, cfg: TokenizeConfig, info: TokenizerInfo) -> dict[str, Any]:
    """A checkpoint URL: the actors fetch it (once per node) and check it is what the driver read."""
    if not is_remote(spec):
        return {}
    return {"storage_options": effective_storage_options(spec, cfg.storage_options), "sha256": info.checkpoint_sha256}


def build_dataset(
    cfg: TokenizeConfig, pending: list, skip: Mapping[str, set[int]], spec: str, info: TokenizerInfo,
    max_tokens: int, actors: ActorPlan, opts_in: Mapping[str, Any], opts_out: Mapping[str, Any],
    encoder_cls: type = TokenizeBatch, io_options: Mapping[str, Any] | None = None,
):
    """The lazy Ray Data pipeline: shards -> read+decode tasks -> encoder actors -> write tasks.
    `io_options`: the write tasks' Ray options (`io_task_options`; default: reserve no CPU)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    items = [{"shard": s.to_json(), "skip": sorted(skip.get(s.id, ()))} for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_shard_batch, batch_size=1, batch_format="pyarrow", num_cpus=1,
                        fn_kwargs={"storage_options": dict(opts_in), "rows_per_batch": cfg.read_batch_rows,
                                   "retry_policy": cfg.retry_policy})
    ds = ds.map_batches(decode_batch, batch_size=None, batch_format="pyarrow", num_cpus=1,
                        fn_kwargs={"image_size": info.image_size, "max_pixels": cfg.max_pixels,
                                   "min_side": cfg.min_side, "defer_jpeg": cfg.gpu_decode})
    # Blocks of about one encoder batch, so encoding starts while the rest of a shard decodes. The
    # repartition also keeps Ray Data from fusing the decode tasks into the actors, where decoding
    # would queue behind encoding instead of overlapping it.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    encode_args: dict[str, Any] = {"num_cpus": actors.cpus_per_actor}
    if actors.gpus_per_actor:
        encode_args["num_gpus"] = actors.gpus_per_actor
    ds = ds.map_batches(
        encoder_cls,
        fn_constructor_kwargs={"model": spec, "max_tokens": None if cfg.length_target else max_tokens,
                               "length_target": cfg.length_target, "keep_all_tokens": cfg.keep_all_tokens,
                               **_device_kwargs(cfg, actors), **_remote_model_kwargs(spec, cfg, info),
                               "num_threads": None if actors.gpus_per_actor else actors.num_threads,
                               "precision": cfg.precision, "compile": cfg.compile,
                               "decode": {"max_pixels": cfg.max_pixels, "min_side": cfg.min_side}},
        batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=actors.smallest, max_size=actors.num_actors),
        **encode_args,  # Ray Data restarts killed actors and retries their batches by default
    )
    io_options = dict(io_options or {"num_cpus": 0})
    return ds.map_batches(writer.write_pieces_batch, batch_size=None, batch_format="pyarrow",
                          compute=TaskPoolStrategy(size=max(2, 2 * actors.num_actors)),  # caps the writers
                          fn_kwargs={"output": cfg.output, "storage_options": dict(opts_out)}, **io_options)


def io_task_options(nodes: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Ray options of the write and finalize tasks (light I/O), from `ray.nodes()`.

    They reserve no CPU: a reservation would queue them behind read/decode tasks that Ray Data
    back-pressures while those hold their CPUs, and the job hangs on small nodes (2 CPUs). A task
    that reserves nothing fits any node, and Ray places it beside its caller, the driver: on a
    cluster whose head advertises no CPU (cluster.yaml's, which only schedules) every write and
    finalize would run there. A label selector on the node id keeps them off the nodes without CPUs;
    a cluster whose nodes all have CPUs (a laptop, a fixed cluster) gets none. Nodes that join later
    are workers (an autoscaling cluster adds only those).
    """
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    cpu_less = sorted(n["NodeID"] for n in nodes if n.get("Alive") and not n.get("Resources", {}).get("CPU"))
    if not cpu_less:
        return {"num_cpus": 0}
    avoid = f"!{cpu_less[0]}" if len(cpu_less) == 1 else f"!in({', '.join(cpu_less)})"
    return {"num_cpus": 0, "label_selector": {NODE_ID_LABEL_KEY: avoid}}


def _report_gpu_nodes(actors: ActorPlan, stop: threading.Event, every_s: float = 10.0) -> None:
    """Progress while an autoscaling pool waits for GPU nodes: says how many are up, until all are."""
    import ray

    last = None
    while True:
        holds = int(ray.cluster_resources().get("GPU", 0.0) / actors.gpus_per_actor + 1e-9)
        if holds != last:
            if holds == 0:
                log.info("waiting for GPU nodes: none up yet; the pending encoder actors ask the autoscaler "
                         "for %d x %g GPU", actors.num_actors, actors.gpus_per_actor)
            else:
                log.info("GPU nodes: room for %d of %d encoder actors%s", min(holds, actors.num_actors),
                         actors.num_actors, "" if holds >= actors.num_actors else "; waiting for more")
            last = holds
        if holds >= actors.num_actors or stop.wait(every_s):
            return


def _execute(
    cfg: TokenizeConfig, pending: list, skip: dict[str, set[int]], spec: str, info: TokenizerInfo,
    max_tokens: int, meta: dict, opts_in: dict, opts_out: dict, encoder_cls: type, markers: dict,
) -> tuple[dict[str, Any], str]:
    """Run the Ray Data pipeline over the pending shards; fills `markers`; returns (run record, stats)."""
    import ray

    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    actors = plan_actors(
        resources.get("CPU", 0.0), resources.get("GPU", 0.0),
        largest_node_cpus=max((n["Resources"].get("CPU", 0.0) for n in nodes), default=None),
        num_actors=cfg.num_actors, cpus_per_actor=cfg.cpus_per_actor, gpus_per_actor=cfg.gpus_per_actor,
    )
    run: dict[str, Any] = {
        "cluster": {"nodes": len(nodes), "cpus": resources.get("CPU", 0.0), "gpus": resources.get("GPU", 0.0)},
        "actors": actors.num_actors, "cpus_per_actor": actors.cpus_per_actor,
        "gpus_per_actor": actors.gpus_per_actor, "batch_size": cfg.batch_size,
        "shards_processed": len(pending), "samples_processed": 0, "io_retries": 0, "pipeline_time_s": 0.0,
        "images_per_s": 0.0,
    }
    if not pending:
        return run, ""
    size = f"{actors.smallest}..{actors.num_actors}" if actors.autoscales else str(actors.num_actors)
    log.info("encoder pool: %s actor(s) x (%g CPU reserved, %d thread(s), %g GPU), batch %d", size,
             actors.cpus_per_actor, actors.num_threads, actors.gpus_per_actor, cfg.batch_size)
    stop_watch = threading.Event()
    if actors.gpus_per_actor and resources.get("GPU", 0.0) + 1e-9 < actors.num_actors * actors.gpus_per_actor:
        threading.Thread(target=_report_gpu_nodes, args=(actors, stop_watch), daemon=True).start()
    io_options = io_task_options(nodes)
    # An OSError in a stage (a full or read-only output) reaches the CLI as itself, its one line; Ray
    # Data's default UserCodeException wrapper loses it on the way to the driver.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    ds = build_dataset(cfg, pending, skip, spec, info, max_tokens, actors, opts_in, opts_out, encoder_cls,
                       io_options)
    by_id = {s.id: s for s in pending}
    finalize = ray.remote(max_retries=3, **io_options)(writer.finalize_shard_task)
    tracker = ShardTracker(skip)
    refs: dict[str, Any] = {}
    start = time.perf_counter()
    first_output = None  # seconds until the first rows were written: start-up (actors, model load)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if first_output is None:
                first_output = time.perf_counter() - start
            for record in batch.to_pylist():
                if tracker.update(record):
                    sid = record["shard"]
                    refs[sid] = finalize.remote(cfg.output, opts_out, by_id[sid].to_json(), tracker.totals[sid],
                                                meta, retries=tracker.retries.get(sid, 0))
    except StorageUnavailableError as e:  # a write task's retries ran out (Ray re-raises it as its cause)
        raise IncompleteRunError(f"writing stopped: {describe(e)}; re-run the same command to finish") from e
    finally:
        stop_watch.set()
    failed = []
    for sid, ref in refs.items():
        try:
            markers[sid] = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            log.error("shard %s could not be finalized: %s", sid, str(e).strip().splitlines()[-1])
            failed.append(sid)
    elapsed = time.perf_counter() - start
    unfinished = tracker.unfinished() + failed
    if unfinished:
        detail = ", ".join(tracker.describe(sid) for sid in unfinished[:5])
        raise IncompleteRunError(f"{len(unfinished)} shards unfinished: {detail}; re-run the same command to finish")
    run.update(samples_processed=tracker.processed, pipeline_time_s=round(elapsed, 3),
               io_retries=sum(tracker.retries.values()),
               first_output_s=round(first_output or 0.0, 3),
               images_per_s=round(tracker.processed / elapsed, 2) if elapsed > 0 else 0.0)
    stats = ds.stats()
    log.debug("ray data stats:\n%s", stats)
    return run, stats
