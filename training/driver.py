"""The driver: launch a run on Ray Train, resume a partial one, skip a finished one, export its model.

Ray Train V2's `TorchTrainer` with `RunConfig(name, storage_path)` = RUN, so that re-running the
same command resumes from RUN's newest checkpoint; `FailureConfig(max_failures)` (-1: retry every
crash); an error no retry fixes (bad data or settings, a full or read-only disk) ends the run at once
(`training.failures`) and is raised as itself, for the job's one line. Resources are sized against the cluster.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import time
from collections.abc import Callable, Mapping
from typing import Any

from training.data import VAL, check_world_size
from training.loop import (
    CRASH_MARKER_ENV,
    CRASH_STEP_ENV,
    LoopSpec,
    _duration,
    train_loop_per_worker,
)
from training.runs import (
    JOB_FILE,
    MARKED_RUN_FILE,
    MODEL_FILE,
    SUMMARY_FILE,
    check_job_settings,
    final_error_of,
    is_out_of_space,
    latest_checkpoint_step,
    mark_recorded_checkpoints,
    open_run,
    out_of_space_at,
    ray_storage,
    restore_ray_snapshot,
    saved_train_state,
)
from training.settings import TrainConfig

log = logging.getLogger("training")


def resolve_resources(cfg: TrainConfig) -> TrainConfig:
    """CPUs per worker and torch threads from the cluster, keeping a CPU free for the data stages.

    On a 2-CPU machine: 1 worker reserves 1 CPU and runs 2 threads; 2 workers reserve 0.5 CPU and
    run 1 thread each (Ray Data's read and decode tasks need the CPU left over, or they never run).
    """
    import ray

    resources = ray.cluster_resources()
    total = float(resources.get("CPU", 1.0))
    if cfg.use_gpu and resources.get("GPU", 0) < cfg.num_workers:
        log.warning("--gpus: the cluster has %g GPU(s) for %d workers now; training starts when an autoscaler "
                    "adds them", resources.get("GPU", 0), cfg.num_workers)
    cpus = cfg.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if cfg.use_gpu else max(0.05, min(1.0, math.floor((total - 1.0) / cfg.num_workers * 20) / 20))
    if cfg.num_workers * cpus > total and not cfg.use_gpu:
        raise ValueError(f"{cfg.num_workers} workers x {cpus:g} CPUs exceed the cluster's {total:g} CPUs")
    threads = cfg.threads
    if threads is None and not cfg.use_gpu:
        per_node = max(float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive"))
        threads = max(1, int(per_node) // cfg.num_workers)  # as if all workers shared the largest node
    return cfg.replace(cpus_per_worker=cpus, threads=threads)


def run_training(
    task: Any,
    make_datasets: Callable[[], dict[str, Any]],
    cfg: TrainConfig,
    *,
    run_url: str,
    storage_options: Mapping[str, Any] | None = None,
    job: str,
    quiet: bool = False,
    preflight: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train `task` on `make_datasets()["train"]` into RUN; resume a partial RUN; skip a finished one.

    "train" is a `training.data.RowSource`: every worker reads its own share of it, in an order that the
    checkpoints record (exact resume). An optional "val" Ray Dataset (small, held out) gives the EMA
    model's loss on it at every checkpoint (TensorBoard `val/loss`, the progress log, `val_loss` in the summary).

    `preflight` runs before Ray starts and after the finished-run check (e.g. listing the inputs, so
    that missing data is one clear error). Returns the run summary (also RUN/train_summary.json), with
    `nothing_to_do` set on a finished RUN.
    """
    from pipelines.sources import effective_storage_options

    opts = effective_storage_options(run_url, storage_options)
    store = open_run(run_url, opts)
    settings = {"job": job, "model": task.describe(), "train": {k: cfg.to_dict()[k] for k in TrainConfig.RESUME_KEYS}}
    check_job_settings(store, settings)
    if store.exists(SUMMARY_FILE):
        summary = store.read_json(SUMMARY_FILE)
        summary["nothing_to_do"] = True
        return summary
    restore_ray_snapshot(store)  # a disk that filled up mid-run can leave Ray's record empty
    mark_recorded_checkpoints(store)
    resume_step = latest_checkpoint_step(store)
    if resume_step:  # before any worker starts: a refused resume must not be retried max_failures times
        check_world_size((saved_train_state(store, resume_step) or {}).get("data_position"), cfg.num_workers)
    if preflight is not None:
        preflight()
    import ray.train
    from ray.train.torch import TorchConfig

    from pipelines.cluster import ensure_ray
    from training.failures import TorchTrainer

    started = ensure_ray()
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        # Ray 2.60 reads Parquet through its new DataSourceV2 by default, whose file listing
        # (ray/data/_internal/dynamic_work_queue.py, _signal_completion) can race its own shutdown and
        # print an InterruptedError traceback from a ListFiles worker thread at the end of a read. The
        # V1 reader passed tests/jobs/test_data_order.py and test_train_generator.py when run with
        # RAY_DATA_USE_DATASOURCE_V2=0 (those tests call the readers directly, so CI runs them on V2).
        ctx.use_datasource_v2 = False
        cfg = resolve_resources(cfg)
        datasets = make_datasets()
        source = datasets.pop("train")
        if not store.exists(JOB_FILE):  # a new run: its checkpoints count once marked
            store.write_bytes(MARKED_RUN_FILE, b"")
            store.write_json(JOB_FILE, {**settings, "resources": {
                "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu, "cpus_per_worker": cfg.cpus_per_worker}})
        crash_at = os.environ.get(CRASH_STEP_ENV)
        spec = LoopSpec(
            task=task, train=cfg, source=source, run_url=run_url, storage_options=dict(opts), threads=cfg.threads, quiet=quiet,
            crash_at_step=int(crash_at) if crash_at else None, crash_marker=os.environ.get(CRASH_MARKER_ENV),
            has_val=VAL in datasets,
        )
        storage_path, name, filesystem = ray_storage(run_url, opts)
        resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=filesystem,
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            datasets=datasets or None,
            dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # "val" goes whole to each worker
        )
        start = time.perf_counter()
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            final = final_error_of(e)
            if final is None:
                raise
            if is_out_of_space(final):
                raise out_of_space_at(final, run_url) from None
            raise final from None
        if result.checkpoint is None:
            raise RuntimeError("training ended without a checkpoint")
        checkpoint_name = posixpath.basename(result.checkpoint.path.rstrip("/"))
        _publish_model(store, f"{checkpoint_name}/{MODEL_FILE}")
        summary = dict(result.return_value or {})
        summary.update(job=job, run=run_url, model=posixpath.join(run_url, MODEL_FILE),
                       checkpoint=checkpoint_name, wall_seconds_this_run=round(time.perf_counter() - start, 1))
        store.write_json(SUMMARY_FILE, summary)
        return summary
    finally:
        if started:
            import ray

            ray.shutdown()


def _publish_model(store: Any, source: str) -> None:
    """RUN/model.safetensors from the last checkpoint's, whole or not at all (a local copy under a
    temporary name, renamed; a store's copy is one server-side request)."""
    if not store.is_local:
        store.fs.copy(store.path(source), store.path(MODEL_FILE))
        return
    tmp = store.path(f".{MODEL_FILE}.{os.getpid()}.tmp")
    try:
        store.fs.copy(store.path(source), tmp)
        os.replace(tmp, store.path(MODEL_FILE))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def summary_line(job: str, summary: Mapping[str, Any]) -> str:
    """One line for the terminal: what was trained, or that nothing was left to do."""
    loss = summary.get("loss")
    loss_text = f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss ?"
    if summary.get("nothing_to_do"):
        return f"{job}: {summary.get('run')} is already finished ({summary.get('step')} steps, {loss_text}); nothing to do"
    return (
        f"{job}: {summary.get('step')} steps, {loss_text}, {_duration(float(summary.get('train_seconds', 0.0)))} "
        f"of training on {summary.get('world_size')} worker(s); model: {summary.get('model')}"
    )
