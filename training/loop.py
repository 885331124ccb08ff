"""The Ray Train worker loop: resume, train to `max_steps`, checkpoint, validate, log, draw grids.

Runs inside every Ray Train worker (DDP over gloo on CPU, nccl on GPU). Each worker reads its own rows
(`training.data.RowStream`) from the position its checkpoint recorded, so a resumed run repeats nothing
and skips nothing. Rank 0 holds the EMA, writes TensorBoard events, progress lines and grids.
Checkpoints are written to a local folder by every worker that holds a part (ddp: rank 0; fsdp: every
rank) and uploaded to RUN in the background by `ray.train.report(checkpoint_upload_mode=ASYNC)`: one
upload thread per worker, so uploads of a run never overlap, and Ray registers them in order once
every worker's part is there. Training goes on meanwhile; rank 0's `_Publisher` then writes the
checkpoint's completion marker (`flextok.runs.COMPLETE_FILE`), the only sign a reader of RUN trusts,
and the last checkpoint is complete before the loop returns. Does not own what a run folder looks
like (`training.runs`) or how the run is launched (`training.driver`).
"""

from __future__ import annotations

import io
import logging
import math
import os
import posixpath
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.data import VAL, Position, RowStream, batch_stream, prefetched, resume_position
from training.runs import (
    COMPLETE_FILE,
    MODEL_FILE,
    TB_DIR,
    checkpoint_dir_name,
    copy_ray_snapshot,
    final_error_of,
    grid_name,
    is_out_of_space,
    open_run,
    out_of_space_at,
)
from training.settings import TrainConfig
from training.trainer import Trainer, _autocast

log = logging.getLogger("training")

# Test-only fault injection: rank 0 dies (os._exit) once at this step; the marker file makes it once.
CRASH_STEP_ENV = "FLEXTOK_TEST_CRASH_AT_STEP"
CRASH_MARKER_ENV = "FLEXTOK_TEST_CRASH_MARKER"


def grid_png(images: torch.Tensor, row_labels: list[str] | None, col_labels: list[str] | None) -> bytes:
    """(R, C, 3, H, W) in [-1, 1] -> PNG bytes of a labelled grid (`flextok.viz`)."""
    from flextok.viz import image_grid

    buf = io.BytesIO()
    image_grid(images, row_labels=row_labels, col_labels=col_labels).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class LoopSpec:
    """Everything a worker needs, shipped once in `train_loop_config`."""

    task: Any
    train: TrainConfig
    source: Any  # the training rows (`training.data.RowSource`), read by each worker itself
    run_url: str
    storage_options: dict[str, Any]
    threads: int | None = None
    quiet: bool = False
    crash_at_step: int | None = None  # test-only fault injection (CRASH_STEP_ENV)
    crash_marker: str | None = None
    has_val: bool = False  # a "val" dataset: its loss is logged at every checkpoint


def _worker_logging(quiet: bool) -> None:
    logger = logging.getLogger("training")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


class _Monitor:
    """Rank 0's metrics: TensorBoard events under RUN (staged locally for remote RUNs), progress lines."""

    def __init__(self, spec: LoopSpec, trainer: Trainer, world: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.spec, self.trainer = spec, trainer
        self.store = open_run(spec.run_url, spec.storage_options)
        if self.store.is_local:
            self.log_dir, self.staged = self.store.path(TB_DIR), False
        else:
            self.log_dir, self.staged = tempfile.mkdtemp(prefix="flextok-tb-"), True
        self.writer = SummaryWriter(self.log_dir)
        self.world = world
        peak = spec.train.peak_tflops or peak_tflops(trainer.device)
        self.peak_flops = peak * 1e12 if peak else None
        self.start_window()

    def start_window(self) -> None:
        """Throughput windows start when data flows (not while the Ray Dataset starts up)."""
        self.window_start, self.window_step = time.perf_counter(), self.trainer.step

    def log(self, loss: float, grad_norm: float, lr: float, items: int, positions: tuple[float, float] = (0, 0)) -> None:
        """One progress line and its TensorBoard scalars; `items` counts all workers since the last log,
        `positions` (computed, real) the sequence positions of those steps (padding = the difference)."""
        t = self.trainer
        now = time.perf_counter()
        rate = items / max(now - self.window_start, 1e-9)
        steps = max(t.step - self.window_step, 1)
        steps_per_s = (t.step - self.window_step) / max(now - self.window_start, 1e-9)
        item = self.spec.task.item_name
        scalars = [("loss", loss), ("lr", lr), ("grad_norm", grad_norm), (f"{item}_per_second", rate),
                   (f"{item}_per_step", items / steps)]
        computed, real = positions
        padding = 1.0 - real / computed if computed else None
        if padding is not None:
            scalars.append(("padding_fraction", padding))
        mfu = self.mfu(rate)
        if mfu is not None:
            scalars.append(("mfu", mfu))
        for name, value in scalars:
            self.writer.add_scalar(f"train/{name}", value, t.step)
        eta = (self.spec.train.max_steps - t.step) / steps_per_s if steps_per_s > 0 else float("nan")
        log.info(
            "%s step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.1f %s/s | %.0f %s/step%s%s | eta %s",
            self.spec.task.name, t.step, self.spec.train.max_steps, loss, lr, grad_norm, rate, item, items / steps,
            item, f" | padding {100 * padding:.1f}%" if padding is not None else "",
            f" | MFU {100 * mfu:.1f}%" if mfu is not None else "", _duration(eta),
        )
        self.start_window()

    def mfu(self, items_per_second: float) -> float | None:
        """Model FLOPs utilisation of all workers: achieved matmul FLOP/s over their bf16 peak."""
        if self.peak_flops is None:
            return None
        return items_per_second * self.spec.task.train_flops_per_item() / (self.world * self.peak_flops)

    def validate(self, shard) -> float | None:
        """Mean loss of the EMA model over the held-out rows, with fixed noise: comparable across steps."""
        t, task, cfg = self.trainer, self.spec.task, self.spec.train
        start = time.perf_counter()
        rng = torch.Generator(device=t.device).manual_seed(cfg.seed + 1)
        total, weight = 0.0, 0
        with torch.no_grad(), _autocast(t.device):
            for batch in shard.iter_torch_batches(batch_size=cfg.worker_batch_size, collate_fn=task.collate_fn()):
                batch = task.prepare_batch(batch, t.device)
                n = task.num_items(batch)
                total += float(task.loss(t.ema_model, batch, rng)) * n
                weight += n
        if not weight:
            return None
        value = total / weight
        self.writer.add_scalar("val/loss", value, t.step)
        log.info("%s step %d | val loss %.4f on %d held-out %s (%.1f s)", task.name, t.step, value, weight,
                 task.item_name, time.perf_counter() - start)
        return value

    def grid(self, reference: Any) -> None:
        t = self.trainer
        start = time.perf_counter()
        with torch.no_grad():
            out = self.spec.task.grid(t.ema_model, reference)
        if out is None:
            return
        images, rows, cols = out
        rel = grid_name(t.step)
        self.store.write_bytes(rel, grid_png(images, rows, cols))
        log.info("grid written to %s (%.1f s)", posixpath.join(self.spec.run_url, rel), time.perf_counter() - start)

    def sync(self) -> None:
        """Flush events; for a remote RUN, upload the event files (one per attempt, never clobbered)."""
        self.writer.flush()
        if self.staged:
            for name in os.listdir(self.log_dir):
                self.store.fs.put_file(os.path.join(self.log_dir, name), self.store.path(f"{TB_DIR}/{name}"))

    def close(self) -> None:
        self.sync()
        self.writer.close()


# Dense bf16 tensor-core peaks (TFLOP/s) of GPUs by name, from their vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak when known by name (None on CPUs and unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _budget_stream(spec: LoopSpec, task: Any, cfg: TrainConfig, rank: int, world: int, saved: dict[str, Any] | None):
    """This worker's token-budget micro-batches (`training.batching.budget_batches` over its `RowStream`) as
    (batch, position) pairs made in a thread ahead. A position is the row stream's before the micro-batch's
    window plus the micro-batches of the window taken: a resume starts the row stream there and skips those."""
    from training.batching import budget_batches

    skip = 0
    if saved is not None:  # [epoch, window, row, micro-batches taken] per worker
        skip = saved["positions"][rank][3]
        saved = {**saved, "positions": [p[:3] for p in saved["positions"]]}
    position = resume_position(saved, spec.source.num_units, rank, world, 0)
    stream = RowStream(spec.source, seed=cfg.seed, rank=rank, world_size=world, window_rows=cfg.shuffle_buffer,
                       position=position)
    items = budget_batches(stream, task.collate_fn(), task.sequence_costs, budget=cfg.micro_token_budget,
                           batching=cfg.batching, row_length=cfg.pack_length or task.row_length, seed=cfg.seed,
                           skip=skip)
    if cfg.use_gpu:
        items = (({k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, where)
                 for batch, where in items)
    return prefetched(items)


class _Publisher:
    """Rank 0: marks checkpoints complete once Ray has committed them (every worker's part uploaded),
    in a background thread, so that training does not wait for uploads."""

    def __init__(self, store, trainer: Trainer) -> None:
        self.store, self.trainer = store, trainer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flextok-publish")
        self.pending: list[Future] = []

    def submit(self) -> None:
        self.pending.append(self.pool.submit(self._publish))

    def _publish(self) -> None:
        import ray.train

        # Blocks until the newest report's checkpoint is committed (those before it are, in order).
        committed = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        for reported in committed:
            name = posixpath.basename(reported.checkpoint.path.rstrip("/"))
            if self.store.exists(f"{name}/{COMPLETE_FILE}") or not self.store.exists(f"{name}/{MODEL_FILE}"):
                continue  # marked, or already deleted by Ray (the newest `keep_checkpoints` stay)
            copy_ray_snapshot(self.store, name)  # first: a complete checkpoint is always in the copy
            # the step training had reached when the upload was done: evidence it went on meanwhile
            self.store.write_json(f"{name}/{COMPLETE_FILE}", {"published_at_step": self.trainer.step})
            log.info("checkpoint %s uploaded and complete (training at step %d)", name, self.trainer.step)

    def drain(self) -> None:
        """Wait for every checkpoint reported so far to be committed and marked (errors are raised)."""
        while self.pending:
            self.pending.pop(0).result()


def _maybe_crash(spec: LoopSpec, step: int, rank: int, publisher: _Publisher | None) -> None:
    """Test-only: a real process death of rank 0 at `crash_at_step`, once (the marker remembers),
    after the checkpoints reported so far are uploaded (so the resume point does not depend on timing)."""
    if spec.crash_at_step != step or rank != 0 or not spec.crash_marker or os.path.exists(spec.crash_marker):
        return
    if publisher is not None:
        publisher.submit()
        publisher.drain()
    Path(spec.crash_marker).write_text(f"killed at step {step}\n")
    log.warning("test fault injection: rank 0 exits at step %d", step)
    os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function: resume, train to `max_steps`, checkpoint, log, grid.

    An error no retry can fix (`training.runs.final_error_of`: bad data or settings, a full or
    read-only disk) is raised as itself, a full disk as `OSError(errno, strerror, file)`: Ray pickles
    the worker's exception to its controller without its cause chain, and the controller's failure
    policy (`training.failures.StopOnFinalErrors`) ends the run on it at once.
    """
    from training.failures import quiet_final_errors

    spec: LoopSpec = config["spec"]
    quiet_final_errors()
    try:
        return _train(spec)
    except Exception as e:
        final = final_error_of(e)
        if final is None or final is e and not is_out_of_space(e):
            raise
        if is_out_of_space(final):
            raise out_of_space_at(final, spec.run_url) from e
        raise final from None


def _train(spec: LoopSpec) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch

    task, cfg = spec.task, spec.train
    _worker_logging(spec.quiet)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def wrap(model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": task.find_unused_parameters}
        )

    trainer = Trainer(task, cfg, device, is_main=rank == 0, wrap=wrap)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = trainer.load(Path(folder))
        if rank == 0:
            log.info("%s resumed from step %d (loss %s)", task.name, state["step"], state["loss"])
    trainer.reseed(rank)
    monitor = _Monitor(spec, trainer, world) if rank == 0 else None
    if cfg.token_budget is not None:
        batches = _budget_stream(spec, task, cfg, rank, world, trainer.data_position)
    else:
        position = resume_position(trainer.data_position, spec.source.num_units, rank, world, trainer.step)
        stream = RowStream(spec.source, seed=cfg.seed, rank=rank, world_size=world, window_rows=cfg.shuffle_buffer,
                           position=position)
        batches = batch_stream(stream, task.collate_fn(), cfg.micro_batch_size, pin_memory=cfg.use_gpu)
    val_shard = ray.train.get_dataset_shard(VAL) if spec.has_val and rank == 0 else None
    reference = None
    sums = torch.zeros(6, device=device)  # loss, grad norm, items, computed and real positions since the last log; a checkpoint is due
    publisher = _Publisher(open_run(spec.run_url, spec.storage_options), trainer) if rank == 0 else None
    last_checkpoint = time.monotonic()
    uploaded_at: dict[str, int] = {}  # checkpoint -> the step training had reached when its upload ended
    count = 0
    attempt_start = time.perf_counter()
    seconds_before = trainer.train_seconds
    grid_done_at = -1
    if rank == 0:
        if cfg.token_budget is not None:
            per_worker = f"{cfg.token_budget // world} positions per worker ({cfg.grad_accum} x {cfg.micro_token_budget}, {cfg.batching})"
        else:
            per_worker = f"batch {cfg.worker_batch_size} per worker ({cfg.grad_accum} x {cfg.micro_batch_size})"
        log.info("%s: %d worker(s) (%s) on %s, %s, steps %d -> %d", task.name, world, cfg.strategy, device,
                 per_worker, trainer.step, cfg.max_steps)
    while trainer.step < cfg.max_steps:
        micro = []
        for _ in range(cfg.grad_accum):
            batch, position = next(batches)
            micro.append(task.prepare_batch(batch, device))
        if reference is None:
            reference = micro[0]
            if monitor is not None:
                monitor.start_window()
        loss, grad_norm, lr = trainer.train_step(*micro)
        num_items = float(sum(task.num_items(b) for b in micro))
        counted = [task.positions(b) or (0, 0) for b in micro]
        host = torch.tensor([num_items, sum(c[0] for c in counted), sum(c[1] for c in counted)], dtype=torch.float32)
        sums[:5] += torch.cat([torch.stack([loss, grad_norm]), host.to(device, non_blocking=True)])
        count += 1
        trainer.train_seconds = seconds_before + time.perf_counter() - attempt_start
        _maybe_crash(spec, trainer.step, rank, publisher)
        step = trainer.step
        is_checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if step % cfg.log_every == 0 or is_checkpoint:  # checkpoints carry up-to-date counters
            if rank == 0 and cfg.checkpoint_minutes and time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint_minutes:
                sums[5] = 1.0  # rank 0's clock decides; the all-reduce tells every rank at this same step
            if world > 1:  # every rank reaches this step: the collective is safe
                torch.distributed.all_reduce(sums)
            loss_sum, norm_sum, items, computed, real, due = sums.tolist()
            is_checkpoint = is_checkpoint or due > 0
            trainer.last_loss = loss_sum / (count * world)
            trainer.items_seen += int(items)
            if monitor is not None:
                monitor.log(trainer.last_loss, norm_sum / (count * world), lr, int(items), (computed, real))
            sums.zero_()
            count = 0
        is_grid = bool(cfg.grid_every) and step % cfg.grid_every == 0
        if is_grid or is_checkpoint:
            trainer.gather_ema()  # fsdp: a collective into the main worker's plain EMA; ddp: nothing
        if is_grid:
            if monitor is not None:
                monitor.grid(reference)
            grid_done_at = step
        if is_checkpoint:
            trainer.data_position = gather_positions(position, spec.source.num_units, world, device)
            if monitor is not None and val_shard is not None:
                trainer.val_loss = monitor.validate(val_shard)
            _report(trainer, monitor, rank, publisher, uploaded_at, spec.run_url)
            last_checkpoint = time.monotonic()
    batches.close()
    if grid_done_at != trainer.step and reference is not None:
        trainer.gather_ema()
        if monitor is not None:
            monitor.grid(reference)
    # The last checkpoint is uploaded and complete before the run returns (every rank waits for it).
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    if publisher is not None:
        publisher.submit()
        publisher.drain()
    if monitor is None:
        return None
    monitor.close()
    return {
        "step": trainer.step, "loss": trainer.last_loss, "val_loss": trainer.val_loss,
        "train_seconds": round(trainer.train_seconds, 1),
        "items_seen": trainer.items_seen, "item_name": task.item_name, "world_size": world, "device": str(device),
        "uploaded_at_step": uploaded_at,
        "num_parameters": sum(p.numel() for p in trainer.model.parameters()),
    }


def gather_positions(position: Position, num_units: int, world: int, device: torch.device) -> dict[str, Any]:
    """Every worker's data position, for the checkpoint (a collective: every worker calls it)."""
    mine = torch.tensor(position.to_list(), dtype=torch.int64, device=device)
    if world > 1:
        everyone = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(everyone, mine)
    else:
        everyone = [mine]
    return {"world_size": world, "num_units": num_units, "positions": [t.tolist() for t in everyone]}


def _report(trainer: Trainer, monitor: _Monitor | None, rank: int, publisher: _Publisher | None,
            uploaded_at: dict[str, int], run_url: str) -> None:
    """A checkpoint, written locally and handed to Ray to upload to RUN/checkpoint_<step> in the
    background; every rank reports. ddp: rank 0 writes it; fsdp: every rank writes its shard (a
    collective), and Ray uploads each rank's folder into the same checkpoint folder. `uploaded_at`
    gets, per checkpoint, the step training had reached when this rank's upload ended (> the
    checkpoint's step: training went on meanwhile)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    metrics = {"step": trainer.step, "loss": trainer.last_loss, "train_seconds": trainer.train_seconds}
    if rank != 0 and not trainer.sharded:
        ray.train.report(metrics)
        return
    folder = Path(tempfile.mkdtemp(prefix="flextok-ckpt-"))  # Ray deletes it once uploaded
    trainer.save(folder)
    if monitor is not None:
        monitor.sync()

    def upload(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        """Ray's own upload (pyarrow copy to RUN), run on this worker's upload thread."""
        try:
            persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, name)
        except OSError as e:  # pyarrow names no file: the checkpoint's folder is the one
            if is_out_of_space(e):
                raise out_of_space_at(e, posixpath.join(run_url, name)) from e
            raise
        uploaded_at[name] = trainer.step
        return persisted

    ray.train.report(
        metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
        checkpoint_dir_name=checkpoint_dir_name(trainer.step), checkpoint_upload_fn=upload,
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True,
    )
    if publisher is not None:
        publisher.submit()
        log.info("checkpoint at step %d written; uploading in the background", trainer.step)
