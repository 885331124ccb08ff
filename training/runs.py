"""Run folders: the one owner of RUN's layout, its newest checkpoint and the provenance of its models.

The run folder RUN (a local path or an fsspec URL such as s3://bucket/run):

    job.json                  settings the run was started with; a re-run must use the same ones
    checkpoint_<step>/        Ray Train checkpoints (the newest `keep_checkpoints`), uploaded in the background:
        model.safetensors       EMA weights written by the model's own `save_pretrained` (+ step),
                                so a checkpoint folder loads like a finished model
        train_state.safetensors ddp: online weights (`model.*`), AdamW moments (`optim.*`) and the
                                step state as JSON metadata (counters, every worker's data position)
        shards/                 fsdp instead: online weights, EMA and AdamW moments as one
                                safetensors shard per worker (torch.distributed.checkpoint)
        train_state.json        fsdp: the step state (the same JSON)
        _COMPLETE               written last, once every worker's part is uploaded: readers take only
                                checkpoints with it (`flextok.runs`)
    _MARKED                   the run marks its checkpoints (so a folder without a marker is partial)
    checkpoint_manager_snapshot.json   Ray Train's record of the checkpoints (what resume reads)
    tensorboard/              event files: loss, lr, grad norm, images/s or tokens/s
    grids/step_<step>.png     reconstruction or sample grids (rank 0)
    model.safetensors         the final EMA model
    train_summary.json        written last: the run is finished and a re-run does nothing
    _ray_snapshot.json        a copy of Ray's record as it stood when the newest complete checkpoint was
                              marked: Ray rewrites its record in place, and a full disk can leave it empty

Where a run's model is and which tokenizer speaks which tokens are `flextok.runs`' (below every
layer); this module applies them to RUN as a store (local or remote) and resolves the tokenizer that
decodes a generator run's grids.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flextok.runs import (
    CHECKPOINT_PREFIX,
    COMPLETE_FILE,
    MARKED_RUN_FILE,
    MODEL_FILE,
    checkpoint_dir_name,
    complete_checkpoints,
)
from flextok.runs import newest_model as _newest_model
from pipelines.writer import OutputStore

log = logging.getLogger("training.runs")

__all__ = ["CHECKPOINT_PREFIX", "COMPLETE_FILE", "MARKED_RUN_FILE", "MODEL_FILE", "checkpoint_dir_name"]  # re-exported: the layout in one place

STATE_FILE = "train_state.safetensors"
STATE_KIND = "TrainState"
SHARD_DIR = "shards"  # fsdp: one safetensors shard per worker (torch.distributed.checkpoint)
TRAIN_STATE_FILE = "train_state.json"  # fsdp: step, counters and settings beside the shards
JOB_FILE = "job.json"
SUMMARY_FILE = "train_summary.json"
TB_DIR = "tensorboard"
GRID_DIR = "grids"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train 2.60's record of the checkpoints
SNAPSHOT_COPY_FILE = "_ray_snapshot.json"
# Errors that end a run at once, never retried (a retry cannot fix them): a worker's exception of
# these types anywhere in its cause chain is the user's (bad data, bad settings) ...
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)
# ... and a filesystem that takes no more writes (full, over quota, read-only, a file over its limit):
# retrying cannot free space. Anything else (a killed process, a lost node, a storage fault) is retried.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def open_run(url: str, storage_options: Mapping[str, Any] | None = None) -> OutputStore:
    """RUN as a store (local or remote), for reading and writing its files by relative name."""
    return OutputStore(url, storage_options)


def grid_name(step: int) -> str:
    return f"{GRID_DIR}/step_{step:07d}.png"


def ray_storage(run_url: str, storage_options: Mapping[str, Any]) -> tuple[str, str, Any]:
    """RUN -> (Ray Train storage_path, name, storage_filesystem or None): RUN is the experiment folder."""
    store = open_run(run_url, storage_options)
    parent, name = posixpath.split(store.root.rstrip("/"))
    if not name:
        raise ValueError(f"--output {run_url} must name a folder, not a filesystem root")
    if store.is_local:
        return parent, name, None
    import pyarrow.fs

    return parent, name, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))


def checkpoint_steps(store: OutputStore) -> list[int]:
    """Steps of RUN's complete `checkpoint_<step>` folders, oldest first (local or remote)."""
    return [step for step, _ in complete_checkpoints(_entries(store), store.exists)]


def _entries(store: OutputStore) -> list[str]:
    try:
        return [posixpath.basename(e.rstrip("/")) for e in store.fs.ls(store.path(""), detail=False)]
    except FileNotFoundError:
        return []


def latest_checkpoint_step(store: OutputStore) -> int:
    """The step of RUN's newest `checkpoint_<step>` folder (the one a resumed run starts from), 0 if none."""
    return max(checkpoint_steps(store), default=0)


MAX_HEADER_BYTES = 100 << 20  # a safetensors header larger than this is not one of ours


def saved_train_state(store: OutputStore, step: int) -> dict[str, Any] | None:
    """The step state of RUN's checkpoint_<step> (counters, data positions), read without its tensors;
    None when there is none."""
    folder = checkpoint_dir_name(step)
    if store.exists(f"{folder}/{TRAIN_STATE_FILE}"):
        return store.read_json(f"{folder}/{TRAIN_STATE_FILE}")["train_state"]
    if not store.exists(f"{folder}/{STATE_FILE}"):
        return None
    with store.fs.open(store.path(f"{folder}/{STATE_FILE}"), "rb") as f:  # the safetensors header only
        size = int.from_bytes(f.read(8), "little")
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{store.url}/{folder}/{STATE_FILE} is not a training state (header {size:,} bytes)")
        header = json.loads(f.read(size))
    return json.loads(header.get("__metadata__", {}).get("train_state", "null"))


def newest_model(store: OutputStore) -> str:
    """RUN's model, relative to RUN: `model.safetensors` when finished, else the newest checkpoint's EMA."""
    found = _newest_model(_entries(store), store.exists)
    if found is not None:
        return found
    raise FileNotFoundError(f"no {MODEL_FILE} in run folder {store.url} or its checkpoints")


def latest_model_file(run: str | os.PathLike) -> Path:
    """A local run folder's model: RUN/model.safetensors when finished, else the newest checkpoint's EMA."""
    return Path(run) / newest_model(open_run(str(run)))


def causes(error: BaseException):
    """`error` and its causes: Python's chain, Ray's `.cause`, Ray Train's wrappers of a worker's
    exception (`_base_exc`) and of a controller's (`controller_failure`), every worker's failure."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [error]
    while todo and len(seen) < 64:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        yield current
        failures = getattr(current, "worker_failures", None) or {}
        todo += [failures[rank] for rank in sorted(failures)]  # the lowest rank first
        todo += [e for e in (getattr(current, "_base_exc", None), getattr(current, "controller_failure", None),
                             getattr(current, "cause", None), current.__cause__, current.__context__)
                 if isinstance(e, BaseException)]


class UnreadableDataError(ValueError):
    """A data file that cannot be read (a corrupt page, a torn copy): one line naming the file."""


def is_out_of_space(error: BaseException | None) -> bool:
    """An OSError of `NO_SPACE_ERRNOS`, or one that says it is one of them in its cause (a write error
    that names its file: `pipelines.writer.OutputWriteError`)."""
    if not isinstance(error, OSError):
        return False
    return error.errno in NO_SPACE_ERRNOS or (error.errno is None and is_out_of_space(error.__cause__))


def final_error_of(error: BaseException) -> BaseException | None:
    """The error in `error`'s causes that no retry can fix (`USER_ERRORS`, a filesystem out of space
    or read-only), or None: the run ends at once with it (`training.failures`)."""
    return next((e for e in causes(error) if isinstance(e, USER_ERRORS) or is_out_of_space(e)), None)


def out_of_space_at(error: OSError, where: str) -> OSError:
    """An out-of-space error as `OSError(errno, strerror, file)`, which survives pickling to the driver:
    its own file, else the one its message names (`OutputWriteError`), else `where` (pyarrow's writes
    name none: "[Errno 28] Error writing bytes to file")."""
    if error.errno is None:  # "No space left on device: /run/x": the message holds the cause and the file
        inner = error.__cause__
        code = inner.errno if isinstance(inner, OSError) and inner.errno else errno.ENOSPC
        strerror = os.strerror(code)
        text = str(error)
        return OSError(code, strerror, text[len(strerror) + 2:] if text.startswith(f"{strerror}: ") else where)
    return OSError(error.errno, os.strerror(error.errno), error.filename or where)


def _ray_record(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:  # empty or cut short: a write that did not finish
        return None
    return record if isinstance(record, dict) and isinstance(record.get("checkpoint_results"), list) else None


def _named(record: dict[str, Any]) -> list[str]:
    return [r.get("checkpoint_dir_name") for r in record["checkpoint_results"] if isinstance(r, dict)]


def copy_ray_snapshot(store: OutputStore, name: str, attempts: int = 5, wait_s: float = 0.2) -> None:
    """Before checkpoint `name` is marked complete: a copy of Ray's record naming it (written whole,
    under another name), which `restore_ray_snapshot` puts back when a full disk left the record empty.
    Ray may be rewriting its record meanwhile (the next checkpoint): a record read half-way is read again."""
    for _ in range(attempts):
        record = _ray_record(store.read_bytes(RAY_SNAPSHOT_FILE)) if store.exists(RAY_SNAPSHOT_FILE) else None
        if record is not None and name in _named(record):
            store.write_json(SNAPSHOT_COPY_FILE, record)
            return
        time.sleep(wait_s)
    log.info("Ray's record of %s does not name %s (deleted since, or being rewritten): not copied", store.url, name)


def mark_recorded_checkpoints(store: OutputStore) -> None:
    """Marks complete the checkpoints Ray's (readable) record names: Ray records a checkpoint once every
    worker's upload of it ended, and a full disk can stop rank 0 between that and its marker."""
    record = _ray_record(store.read_bytes(RAY_SNAPSHOT_FILE)) if store.exists(RAY_SNAPSHOT_FILE) else None
    for name in _named(record) if record is not None else []:
        if isinstance(name, str) and store.exists(name) and not store.exists(f"{name}/{COMPLETE_FILE}"):
            store.write_json(f"{name}/{COMPLETE_FILE}", {"marked": "at the next start: Ray's record names it"})


def restore_ray_snapshot(store: OutputStore) -> None:
    """Before a run starts: Ray Train rewrites its record of the checkpoints in place, so a disk that
    filled up mid-run can leave it empty or cut short, and Ray would refuse to start. It is replaced by
    the copy taken when the newest complete checkpoint was marked, keeping the checkpoints still
    complete (Ray may have deleted older ones since); with no copy, by nothing (no checkpoint was
    complete: the run starts over)."""
    if not store.exists(RAY_SNAPSHOT_FILE) or _ray_record(store.read_bytes(RAY_SNAPSHOT_FILE)) is not None:
        return
    copy = _ray_record(store.read_bytes(SNAPSHOT_COPY_FILE)) if store.exists(SNAPSHOT_COPY_FILE) else None
    complete = {checkpoint_dir_name(step) for step in checkpoint_steps(store)}
    if copy is None or not complete & set(_named(copy)):
        log.warning("%s/%s is unreadable (a write cut short) and no complete checkpoint is recorded: "
                    "the run starts over", store.url, RAY_SNAPSHOT_FILE)
        store.rm(RAY_SNAPSHOT_FILE)
        return
    named = _named(copy)
    keep = [i for i, n in enumerate(named) if n in complete]
    results = [copy["checkpoint_results"][i] for i in keep]
    copy["checkpoint_results"] = results
    indices = copy.get("checkpoint_report_indices")
    if isinstance(indices, list) and len(indices) == len(named):  # one report index per checkpoint
        copy["checkpoint_report_indices"] = [indices[i] for i in keep]
    copy["latest_checkpoint_result"] = results[-1]
    store.write_json(RAY_SNAPSHOT_FILE, copy)
    log.warning("%s/%s was unreadable (a write cut short): restored from the copy of checkpoint %s",
                store.url, RAY_SNAPSHOT_FILE, results[-1].get("checkpoint_dir_name"))


def _first_difference(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        # A key the run did not record is a config field added since it started: not compared (the
        # run had no such setting), or no run would resume across a version that adds a field.
        for key in sorted(old):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def _recorded_tokenizer(model: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer run's recorded model as today's runs record it. A run started before the numerical
    conventions were recorded trained with the legacy ones: resuming it under today's would be another
    model, so they count as recorded. A run started before the objective left the architecture config
    recorded it inside the config (its missing fields had their then defaults, today's)."""
    from flextok.config import TokenizerObjective, split_recorded, with_legacy_conventions

    config, objective = split_recorded(model["config"])
    if "norm_eps" not in config:
        config = with_legacy_conventions(config)
    model = {**model, "config": config}
    if "objective" not in model:
        model["objective"] = (objective or TokenizerObjective()).to_dict()
    return model


def check_job_settings(store: OutputStore, settings: dict[str, Any]) -> None:
    """A re-run must use the settings RUN was started with; the first run records them."""
    if not store.exists(JOB_FILE):
        return
    before = store.read_json(JOB_FILE)
    model = before.get("model")
    if isinstance(model, dict) and model.get("kind") == "FlexTok" and isinstance(model.get("config"), dict):
        before["model"] = _recorded_tokenizer(model)
    current = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    found = _first_difference({k: before.get(k) for k in current}, current, "")
    if found:
        path, old, new = found
        raise ValueError(
            f"{store.url} holds a run started with {path.lstrip('.')}={old!r}, not {new!r}; re-run with the "
            "original settings to resume, or use a new --output"
        )


def resolve_init(spec: str | None, storage_options: Mapping[str, Any] | None = None,
                 ) -> tuple[str | None, str | None, str | None]:
    """`--init` -> (what the workers load, this node's file, sha256), or three Nones; one clear error
    when it is missing. A local checkpoint is its absolute path for both. A URL (s3://..., any fsspec
    URL of a file or a run or release folder) stays the URL for the workers, which fetch it once per
    node into the checkpoint cache the tokenize actors use (`init_file`); this node reads its copy."""
    if spec is None:
        return None, None, None
    from flextok.checkpoint import file_sha256, resolve_weights_path
    from pipelines.model import is_remote, local_checkpoint

    if is_remote(spec):
        local = local_checkpoint(spec, storage_options)
        return spec, local, file_sha256(local)
    weights = str(resolve_weights_path(Path(spec).expanduser()).resolve())
    return weights, weights, file_sha256(weights)


def init_file(init: str, sha256: str | None, storage_options: Mapping[str, Any] | None = None) -> str:
    """On a worker: the local file of `--init` as `resolve_init` gave it (a URL is fetched once per node
    and must have the sha256 the driver read)."""
    from pipelines.model import local_checkpoint

    return local_checkpoint(init, storage_options, sha256)


def resolve_grid_tokenizer(explicit: str | None, metadata: dict[str, Any]) -> str | None:
    """A tokenizer file to decode grids, or None (with a log line) when only a random preset is known."""
    from flextok.checkpoint import file_sha256, resolve_weights_path

    if explicit is not None:
        path = resolve_weights_path(explicit)  # one clear error when missing
        sha = metadata.get("checkpoint_sha256")
        if sha and file_sha256(path) != sha:
            raise ValueError(f"--tokenizer {explicit} is not the tokenizer these tokens were made with "
                             f"(sha256 {sha[:12]}…)")
        return str(path)
    recorded = metadata.get("checkpoint_id") or ""
    if recorded.startswith("preset:") or not recorded:
        log.info("tokens come from %s (random weights): no sample grids", recorded or "an unknown tokenizer")
        return None
    if not Path(recorded).exists():
        log.info("tokenizer %s named in the token metadata is not here: no sample grids (pass --tokenizer)", recorded)
        return None
    return str(resolve_weights_path(recorded))
