"""Shared Ray Train machinery of `flextok train-tokenizer` and `flextok train-generator`.

Owns: the run-time training settings (`TrainConfig`) and their flags; AdamW with linear warm-up
then cosine decay, gradient clipping, EMA weights and bf16 autocast on GPUs (`Trainer`: one worker's
state and step, no Ray, so it is unit-tested directly); training checkpoints as safetensors (never
pickle); the per-worker Ray Train loop (DDP over gloo on CPU / nccl on GPU, a checkpoint every N
steps through `ray.train.report`, resume through `ray.train.get_checkpoint`, TensorBoard events, a
progress line and image grids from rank 0); the driver (`run_training`: Ray Train V2 `TorchTrainer`
with `RunConfig(name, storage_path)` so that re-running the same command resumes,
`FailureConfig(max_failures)`, the final export, "already finished"); the Arrow-level collates.
Does not own: models, losses, datasets or grids: a job hands in a task object (see `TrainTask`) and
builds its Ray Datasets.

The run folder RUN (a local path or an fsspec URL such as s3://bucket/run):

    job.json                  settings the run was started with; a re-run must use the same ones
    checkpoint_<step>/        Ray Train checkpoints (the newest `keep_checkpoints`):
        model.safetensors       EMA weights written by the model's own `save_pretrained` (+ step),
                                so a checkpoint folder loads like a finished model
        train_state.safetensors online weights (`model.*`), AdamW moments (`optim.*`) and the step
                                state as JSON metadata
    checkpoint_manager_snapshot.json   Ray Train's record of the checkpoints (what resume reads)
    tensorboard/              event files: loss, lr, grad norm, images/s or tokens/s
    grids/step_<step>.png     reconstruction or sample grids (rank 0)
    model.safetensors         the final EMA model
    train_summary.json        written last: the run is finished and a re-run does nothing
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import nn

from flextok.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from jobs.cli_util import json_arg, positive_int

log = logging.getLogger("jobs.train")

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
STATE_KIND = "TrainState"
JOB_FILE = "job.json"
SUMMARY_FILE = "train_summary.json"
TB_DIR = "tensorboard"
GRID_DIR = "grids"
VAL = "val"  # the held-out dataset's name: given whole to the main worker, never split or shuffled
IGNORE_INDEX = -100  # padding of token batches; the generator's loss ignores it
# Test-only fault injection: rank 0 dies (os._exit) once at this step; the marker file makes it once.
CRASH_STEP_ENV = "FLEXTOK_TEST_CRASH_AT_STEP"
CRASH_MARKER_ENV = "FLEXTOK_TEST_CRASH_MARKER"


# Settings -----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Run-time training settings (architecture lives in the model configs).

    `batch_size` is global: each of `num_workers` workers takes `batch_size / num_workers`.
    `cpus_per_worker` / `threads` None are resolved against the cluster by `resolve_resources`.
    """

    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    grid_every: int = 1000
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    threads: int | None = None
    max_failures: int = 3
    shuffle_buffer: int = 1024

    # A re-run resumes only with the same values of these (the optimisation would differ otherwise).
    RESUME_KEYS = ("max_steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                   "beta1", "beta2", "grad_clip", "ema_decay", "seed")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "grid_every", "max_failures", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch size {self.batch_size} does not split evenly over {self.num_workers} workers")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0 and 0 <= min_lr_ratio <= 1")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0 (grad_clip 0 = no clipping)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.ema_decay < 1):
            raise ValueError("beta1, beta2 and ema_decay must be in [0, 1)")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")

    @property
    def worker_batch_size(self) -> int:
        return self.batch_size // self.num_workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def add_train_args(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The flags both training jobs share; defaults from `defaults`."""
    d = defaults
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=positive_int, default=d.max_steps, help="optimizer steps in all (default %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="global batch size, split evenly over the workers (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW (default %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="cosine decay ends at lr * this (default %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps, at most half of --max-steps (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay on matrices, not on biases/norms (default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global grad norm, 0 = off (default %(default)s)")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA of the weights (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of init, noise and shuffling (default %(default)s)")
    g.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer,
                   help="rows in each worker's local shuffle buffer, 0 = no shuffle (default %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every,
                   help="steps between checkpoints, also written at the end (default %(default)s)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints,
                   help="newest checkpoints kept in RUN (default %(default)s)")
    g.add_argument("--log-every", type=positive_int, default=d.log_every, help="steps between progress lines (default %(default)s)")
    g.add_argument("--grid-every", type=int, default=d.grid_every,
                   help="steps between image grids under RUN/grids, 0 = only at the end (default %(default)s)")
    g.add_argument("--max-failures", type=int, default=d.max_failures,
                   help="worker failures to recover from (from the last checkpoint) before giving up (default %(default)s)")
    g.add_argument("--storage-options", type=json_arg, default=None,
                   help="fsspec options (JSON) for s3:// data and RUN; AWS_* variables are used otherwise")
    g.add_argument("--quiet", action="store_true", help="log warnings only")
    g = p.add_argument_group("resources")
    g.add_argument("--workers", type=positive_int, default=d.num_workers, help="Ray Train workers, DDP (default %(default)s)")
    g.add_argument("--gpus", action="store_true", help="one GPU per worker (nccl, bf16 autocast); default CPU (gloo, fp32)")
    g.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per worker (default: 1, less when the cluster must keep a CPU for data)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per worker (default: the node's CPUs shared by the workers)")


def add_val_args(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    p.add_argument(flag, default=None, metavar="SRC",
                   help=f"held-out {what}: the EMA model's loss on them (fixed noise) is logged at every checkpoint")
    p.add_argument("--val-items", type=positive_int, default=512,
                   help="held-out rows used for the validation loss (default %(default)s)")


def add_init_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--init", default=None, metavar="CKPT",
                   help=f"fine-tune: start from this {what} checkpoint (a file every worker can read: local or a "
                   "shared filesystem); its config is the architecture, so architecture flags are refused")


def resolve_init(path: str | None) -> tuple[str | None, str | None]:
    """`--init` -> (absolute path, sha256), or (None, None); one clear error when it is missing."""
    if path is None:
        return None, None
    from flextok.checkpoint import file_sha256, resolve_weights_path

    weights = resolve_weights_path(Path(path).expanduser()).resolve()
    return str(weights), file_sha256(weights)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every, grid_every=args.grid_every, seed=args.seed, num_workers=args.workers,
        use_gpu=args.gpus, cpus_per_worker=args.cpus_per_worker, threads=args.threads,
        max_failures=args.max_failures, shuffle_buffer=args.shuffle_buffer,
    )


# Optimisation -------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warm-up to `lr`, cosine to `lr * min_lr_ratio`.

    The warm-up takes at most half of the run, so a short run (a smoke test, the quickstart) still
    trains at its peak rate for a while instead of never reaching it.
    """
    warmup = min(cfg.warmup_steps, cfg.max_steps // 2)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW with weight decay on matrices only; also the parameter names in optimizer order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named if p.ndim < 2]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda" or None
    )
    return optimizer, [n for n, _ in decay + no_decay]


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors `<param name>.<field>` (e.g. `decoder.x.weight.exp_avg`)."""
    out = {}
    for index, fields in optimizer.state_dict()["state"].items():
        for field, value in fields.items():
            out[f"{names[index]}.{field}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors`; hyper-parameters come from the optimizer as built."""
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        if name not in index:
            raise CheckpointError(f"optimizer state for unknown parameter {name!r}: the checkpoint is of another model")
        state.setdefault(index[name], {})[field] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


class EMA:
    """An exponential moving average of a model's weights, kept in a second copy of the model."""

    def __init__(self, model: nn.Module, shadow: nn.Module, decay: float) -> None:
        shadow.load_state_dict(model.state_dict())
        self.model = shadow.eval().requires_grad_(False)
        self.decay = decay
        params = list(zip(shadow.parameters(), model.parameters()))
        # Buffers and frozen weights are copied, not averaged: frozen ones stay bit-identical to the model's.
        self._pairs = [(e, p) for e, p in params if p.requires_grad]
        self._copied = list(zip(shadow.buffers(), model.buffers())) + [(e, p) for e, p in params if not p.requires_grad]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Decay ramps up as (1 + step) / (10 + step) so early weights do not dominate short runs."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema, p in self._pairs:
            ema.lerp_(p.detach(), 1.0 - decay)
        for ema, b in self._copied:
            ema.copy_(b)


# One worker's state -------------------------------------------------------------------------------
class TrainTask(Protocol):
    """What a job supplies: pure PyTorch hooks, picklable (it is shipped to every worker)."""

    name: str  # "tokenizer" / "generator", for logs
    item_name: str  # throughput unit: "images" or "tokens"
    find_unused_parameters: bool

    def build_model(self, device: torch.device) -> nn.Module: ...
    def collate_fn(self) -> ArrowBatchCollateFn: ...
    def prepare_batch(self, batch: Any, device: torch.device) -> Any: ...
    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor: ...
    def num_items(self, batch: Any) -> int: ...
    def save_pretrained(self, model: nn.Module, path: Path, *, step: int) -> None: ...
    def grid(self, model: nn.Module, reference: Any) -> tuple[torch.Tensor, list[str], list[str]] | None: ...
    def describe(self) -> dict[str, Any]: ...


def _autocast(device: torch.device):
    """bf16 autocast on GPUs; CPUs train in fp32 (bf16 is ~5x slower than fp32 there, DESIGN §6)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """One worker's model, optimizer, EMA (main worker only) and step counter.

    Args:
        wrap: turns the model into what the loss runs (DDP from `ray.train.torch.prepare_model`);
            None runs the model itself (one process, tests, the benchmark's bare loop).
    """

    def __init__(
        self, task: TrainTask, cfg: TrainConfig, device: torch.device, *, is_main: bool = True,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.task, self.cfg, self.device = task, cfg, torch.device(device)
        torch.manual_seed(cfg.seed)  # the same init on every worker (DDP also broadcasts rank 0's)
        self.model = task.build_model(self.device).train()
        self.module = wrap(self.model) if wrap is not None else self.model
        self.optimizer, self.param_names = build_optimizer(self.model, cfg, self.device)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = EMA(self.model, task.build_model(self.device), cfg.ema_decay) if is_main else None
        self.step = 0
        self.items_seen = 0
        self.train_seconds = 0.0
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        self.rng = torch.Generator(device=self.device)
        self.reseed(0)

    def reseed(self, rank: int) -> None:
        """Noise streams differ per worker and per (re)start step, and repeat for the same ones."""
        self.rng.manual_seed((self.cfg.seed * 1_000_003 + rank * 7919 + self.step) % 2**63)

    def train_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer update on a prepared batch -> (loss, grad norm) as tensors (no host sync), lr."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with _autocast(self.device):
            loss = self.task.loss(self.module, batch, self.rng)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        return loss.detach().float(), grad_norm.detach().float(), lr

    def save(self, folder: Path) -> None:
        """Write the EMA model (the model's own format) and the training state (main worker only)."""
        assert self.ema is not None, "only the main worker holds the EMA and writes checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        self.task.save_pretrained(self.ema.model, folder / MODEL_FILE, step=self.step)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"optim.{k}": v for k, v in optimizer_tensors(self.optimizer, self.param_names).items()})
        state = {"step": self.step, "items_seen": self.items_seen, "train_seconds": round(self.train_seconds, 3),
                 "loss": self.last_loss, "val_loss": self.val_loss}
        save_checkpoint(folder / STATE_FILE, tensors, kind=STATE_KIND, config=self.cfg.to_dict(),
                        extra={"train_state": json.dumps(state), "task": json.dumps(self.task.describe())})

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore what `save` wrote (on every worker; the EMA on the main one)."""
        # On the CPU: load_state_dict moves weights and moments to their parameters' devices, and
        # keeps AdamW's step counters where the (fused or not) optimizer wants them.
        tensors, metadata = load_checkpoint(folder / STATE_FILE)
        if metadata.get("kind") != STATE_KIND:
            raise CheckpointError(f"{folder / STATE_FILE} is not a training state")
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)
        load_optimizer_tensors(
            self.optimizer, self.param_names, {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
        )
        state = json.loads(metadata["train_state"])
        self.step, self.items_seen = int(state["step"]), int(state["items_seen"])
        self.train_seconds, self.last_loss = float(state["train_seconds"]), state["loss"]
        self.val_loss = state.get("val_loss")
        if self.ema is not None:
            ema_state, _ = load_checkpoint(folder / MODEL_FILE)
            self.ema.model.load_state_dict(ema_state, strict=True)
        return state


# Collates (Arrow batches -> tensors, on Ray Data's prefetch threads) ------------------------------
def pad_token_lists(column: pa.Array | pa.ChunkedArray, pad_value: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """A ragged `list<uint16>` column -> (tokens (B, T) int64 padded with `pad_value`, lengths (B,)).

    Vectorised on the Arrow buffers (no per-row Python): T is the longest row; a null row is empty.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise TypeError(f"tokens must be an Arrow list column, got {column.type}")
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # (B,)
    width = int(lengths.max()) if len(lengths) else 0
    tokens = np.full((len(lengths), width), pad_value, dtype=np.int64)
    keep = np.arange(width)[None, :] < lengths[:, None]  # (B, T), True on real tokens, row-major order
    # flatten() honours the slice offset and skips null rows: exactly the real tokens, row by row.
    tokens[keep] = column.flatten().to_numpy(zero_copy_only=False)
    return tokens, lengths


class TokenCollate(ArrowBatchCollateFn):
    """Token rows -> {"tokens": (B, T) int64 padded with -100, "lengths", "label"?} (+ "caption" list)."""

    def __init__(self, *, labels: bool = False, captions: bool = False) -> None:
        self.labels, self.captions = labels, captions

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        tokens, lengths = pad_token_lists(batch.column("tokens"))
        out: dict[str, Any] = {"tokens": torch.from_numpy(tokens), "lengths": torch.from_numpy(lengths)}
        if self.labels:
            out["label"] = torch.from_numpy(batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64))
        if self.captions:
            out["caption"] = batch.column("caption").to_pylist()
        return out


class PixelCollate(ArrowBatchCollateFn):
    """Decoded rows (`pixels`: H*W*3 RGB bytes) -> {"pixels": (B, H, W, 3) uint8}."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        from pipelines.encode import pixels_to_array

        pixels = pixels_to_array(batch.column("pixels"), self.image_size)  # (B, H, W, 3), read-only view
        return {"pixels": torch.from_numpy(np.array(pixels))}


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def grid_png(images: torch.Tensor, row_labels: list[str] | None, col_labels: list[str] | None) -> bytes:
    """(R, C, 3, H, W) in [-1, 1] -> PNG bytes of a labelled grid (`flextok.viz`)."""
    from flextok.viz import image_grid

    buf = io.BytesIO()
    image_grid(images, row_labels=row_labels, col_labels=col_labels).save(buf, format="PNG")
    return buf.getvalue()


# The Ray Train loop -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopSpec:
    """Everything a worker needs, shipped once in `train_loop_config`."""

    task: Any
    train: TrainConfig
    run_url: str
    storage_options: dict[str, Any]
    threads: int | None = None
    quiet: bool = False
    crash_at_step: int | None = None  # test-only fault injection (CRASH_STEP_ENV)
    crash_marker: str | None = None
    has_val: bool = False  # a "val" dataset: its loss is logged at every checkpoint


def _store(url: str, storage_options: Mapping[str, Any] | None):
    from pipelines.writer import OutputStore

    return OutputStore(url, storage_options)


def _worker_logging(quiet: bool) -> None:
    logger = logging.getLogger("jobs")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def batch_stream(shard, task: TrainTask, cfg: TrainConfig, seed: int, use_gpu: bool) -> Iterator[Any]:
    """The worker's shard as an endless stream of full batches, epoch after epoch (reshuffled)."""
    epoch = 0
    buffer = max(cfg.shuffle_buffer, cfg.worker_batch_size) if cfg.shuffle_buffer else None
    while True:
        count = 0
        for batch in shard.iter_torch_batches(
            batch_size=cfg.worker_batch_size, collate_fn=task.collate_fn(), drop_last=True,
            local_shuffle_buffer_size=buffer, local_shuffle_seed=(seed + epoch) if buffer else None,
            prefetch_batches=2, pin_memory=use_gpu,
        ):
            count += 1
            yield batch
        if count == 0:
            raise ValueError(
                f"the training data has fewer than {cfg.worker_batch_size} usable rows per worker; "
                "lower --batch-size or add data"
            )
        epoch += 1


class _Monitor:
    """Rank 0's metrics: TensorBoard events under RUN (staged locally for remote RUNs), progress lines."""

    def __init__(self, spec: LoopSpec, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.spec, self.trainer = spec, trainer
        self.store = _store(spec.run_url, spec.storage_options)
        if self.store.is_local:
            self.log_dir, self.staged = self.store.path(TB_DIR), False
        else:
            self.log_dir, self.staged = tempfile.mkdtemp(prefix="flextok-tb-"), True
        self.writer = SummaryWriter(self.log_dir)
        self.start_window()

    def start_window(self) -> None:
        """Throughput windows start when data flows (not while the Ray Dataset starts up)."""
        self.window_start, self.window_step = time.perf_counter(), self.trainer.step

    def log(self, loss: float, grad_norm: float, lr: float, items: int) -> None:
        """One progress line and its TensorBoard scalars; `items` counts all workers since the last log."""
        t = self.trainer
        now = time.perf_counter()
        rate = items / max(now - self.window_start, 1e-9)
        steps_per_s = (t.step - self.window_step) / max(now - self.window_start, 1e-9)
        item = self.spec.task.item_name
        for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm), (f"{item}_per_second", rate)):
            self.writer.add_scalar(f"train/{name}", value, t.step)
        eta = (self.spec.train.max_steps - t.step) / steps_per_s if steps_per_s > 0 else float("nan")
        log.info(
            "%s step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.1f %s/s | eta %s",
            self.spec.task.name, t.step, self.spec.train.max_steps, loss, lr, grad_norm, rate, item, _duration(eta),
        )
        self.start_window()

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
                total += float(task.loss(t.ema.model, batch, rng)) * n
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
            out = self.spec.task.grid(t.ema.model, reference)
        if out is None:
            return
        images, rows, cols = out
        rel = f"{GRID_DIR}/step_{t.step:07d}.png"
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


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _maybe_crash(spec: LoopSpec, step: int, rank: int) -> None:
    """Test-only: a real process death of rank 0 at `crash_at_step`, once (the marker remembers)."""
    if spec.crash_at_step != step or rank != 0 or not spec.crash_marker or os.path.exists(spec.crash_marker):
        return
    Path(spec.crash_marker).write_text(f"killed at step {step}\n")
    log.warning("test fault injection: rank 0 exits at step %d", step)
    os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function: resume, train to `max_steps`, checkpoint, log, grid."""
    import ray.train
    import ray.train.torch

    spec: LoopSpec = config["spec"]
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
    monitor = _Monitor(spec, trainer) if rank == 0 else None
    batches = batch_stream(ray.train.get_dataset_shard("train"), task, cfg, cfg.seed * 7919 + trainer.step, cfg.use_gpu)
    val_shard = ray.train.get_dataset_shard(VAL) if spec.has_val and rank == 0 else None
    reference = None
    sums = torch.zeros(3, device=device)  # loss, grad norm, items since the last log
    count = 0
    attempt_start = time.perf_counter()
    seconds_before = trainer.train_seconds
    grid_done_at = -1
    if rank == 0:
        log.info("%s: %d worker(s) on %s, batch %d per worker, steps %d -> %d",
                 task.name, world, device, cfg.worker_batch_size, trainer.step, cfg.max_steps)
    while trainer.step < cfg.max_steps:
        batch = task.prepare_batch(next(batches), device)
        if reference is None:
            reference = batch
            if monitor is not None:
                monitor.start_window()
        loss, grad_norm, lr = trainer.train_step(batch)
        sums += torch.stack([loss, grad_norm, torch.tensor(float(task.num_items(batch)), device=device)])
        count += 1
        trainer.train_seconds = seconds_before + time.perf_counter() - attempt_start
        _maybe_crash(spec, trainer.step, rank)
        step = trainer.step
        is_checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if step % cfg.log_every == 0 or is_checkpoint:  # checkpoints carry up-to-date counters
            if world > 1:  # every rank reaches this step: the collective is safe
                torch.distributed.all_reduce(sums)
            loss_sum, norm_sum, items = sums.tolist()
            trainer.last_loss = loss_sum / (count * world)
            trainer.items_seen += int(items)
            if monitor is not None:
                monitor.log(trainer.last_loss, norm_sum / (count * world), lr, int(items))
            sums.zero_()
            count = 0
        if monitor is not None and cfg.grid_every and step % cfg.grid_every == 0:
            monitor.grid(reference)
            grid_done_at = step
        if is_checkpoint:
            if monitor is not None and val_shard is not None:
                trainer.val_loss = monitor.validate(val_shard)
            _report(trainer, monitor, rank)
    if monitor is None:
        return None
    if grid_done_at != trainer.step and reference is not None:
        monitor.grid(reference)
    monitor.close()
    return {
        "step": trainer.step, "loss": trainer.last_loss, "val_loss": trainer.val_loss,
        "train_seconds": round(trainer.train_seconds, 1),
        "items_seen": trainer.items_seen, "item_name": task.item_name, "world_size": world, "device": str(device),
        "num_parameters": sum(p.numel() for p in trainer.model.parameters()),
    }


def _report(trainer: Trainer, monitor: _Monitor | None, rank: int) -> None:
    """A checkpoint from rank 0 (Ray persists it to RUN/checkpoint_<step>); every rank reports."""
    import ray.train

    metrics = {"step": trainer.step, "loss": trainer.last_loss, "train_seconds": trainer.train_seconds}
    if rank != 0:
        ray.train.report(metrics)
        return
    assert monitor is not None
    with tempfile.TemporaryDirectory(prefix="flextok-ckpt-") as folder:
        trainer.save(Path(folder))
        monitor.sync()
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"checkpoint_{trainer.step:08d}",
        )
    # Wait until the controller has registered it: a crash right after must resume from this one.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    log.info("checkpoint at step %d", trainer.step)


# The driver ---------------------------------------------------------------------------------------
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


def _storage(run_url: str, storage_options: Mapping[str, Any]) -> tuple[str, str, Any]:
    """RUN -> (Ray Train storage_path, name, storage_filesystem or None): RUN is the experiment folder."""
    store = _store(run_url, storage_options)
    parent, name = posixpath.split(store.root.rstrip("/"))
    if not name:
        raise ValueError(f"--output {run_url} must name a folder, not a filesystem root")
    if store.is_local:
        return parent, name, None
    import pyarrow.fs

    return parent, name, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))


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


def check_job_settings(store, settings: dict[str, Any]) -> None:
    """A re-run must use the settings RUN was started with; the first run records them."""
    if not store.exists(JOB_FILE):
        return
    before = store.read_json(JOB_FILE)
    current = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    found = _first_difference({k: before.get(k) for k in current}, current, "")
    if found:
        path, old, new = found
        raise ValueError(
            f"{store.url} holds a run started with {path.lstrip('.')}={old!r}, not {new!r}; re-run with the "
            "original settings to resume, or use a new --output"
        )


def _user_error(error: BaseException) -> ValueError | None:
    """A worker's user error (bad data, bad settings) as one ValueError; None for real crashes."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", failure)
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
            return ValueError(str(cause).strip().splitlines()[-1])
    return None


def run_training(
    task: Any,
    make_datasets: Callable[[int], dict[str, Any]],
    cfg: TrainConfig,
    *,
    run_url: str,
    storage_options: Mapping[str, Any] | None = None,
    job: str,
    quiet: bool = False,
    preflight: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train `task` on `make_datasets(order_seed)["train"]` into RUN; resume a partial RUN; skip a finished one.

    `order_seed` (see `data_order_seed`) seeds the training stream's shard order, which the job reshuffles
    at every epoch. An optional `make_datasets(order_seed)["val"]` (small, held out) gives the EMA model's loss on it at every
    checkpoint (TensorBoard `val/loss`, the progress log, `val_loss` in the summary).

    `preflight` runs before Ray starts and after the finished-run check (e.g. listing the inputs, so
    that missing data is one clear error). Returns the run summary (also RUN/train_summary.json), with
    `nothing_to_do` set on a finished RUN.
    """
    from pipelines.sources import effective_storage_options

    opts = effective_storage_options(run_url, storage_options)
    store = _store(run_url, opts)
    settings = {"job": job, "model": task.describe(), "train": {k: cfg.to_dict()[k] for k in TrainConfig.RESUME_KEYS}}
    check_job_settings(store, settings)
    if store.exists(SUMMARY_FILE):
        summary = store.read_json(SUMMARY_FILE)
        summary["nothing_to_do"] = True
        return summary
    if preflight is not None:
        preflight()
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.cluster import ensure_ray

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
        datasets = make_datasets(data_order_seed(cfg.seed, latest_checkpoint_step(store)))
        if not store.exists(JOB_FILE):
            store.write_json(JOB_FILE, {**settings, "resources": {
                "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu, "cpus_per_worker": cfg.cpus_per_worker}})
        crash_at = os.environ.get(CRASH_STEP_ENV)
        spec = LoopSpec(
            task=task, train=cfg, run_url=run_url, storage_options=dict(opts), threads=cfg.threads, quiet=quiet,
            crash_at_step=int(crash_at) if crash_at else None, crash_marker=os.environ.get(CRASH_MARKER_ENV),
            has_val=VAL in datasets,
        )
        storage_path, name, filesystem = _storage(run_url, opts)
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
            datasets=datasets,
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),  # "val" goes whole to each worker
        )
        start = time.perf_counter()
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            user = _user_error(e)
            if user is not None:
                raise user from None
            raise
        if result.checkpoint is None:
            raise RuntimeError("training ended without a checkpoint")
        checkpoint_name = posixpath.basename(result.checkpoint.path.rstrip("/"))
        store.fs.copy(store.path(f"{checkpoint_name}/{MODEL_FILE}"), store.path(MODEL_FILE))
        summary = dict(result.return_value or {})
        summary.update(job=job, run=run_url, model=posixpath.join(run_url, MODEL_FILE),
                       checkpoint=checkpoint_name, wall_seconds_this_run=round(time.perf_counter() - start, 1))
        store.write_json(SUMMARY_FILE, summary)
        return summary
    finally:
        if started:
            import ray

            ray.shutdown()


def latest_checkpoint_step(store) -> int:
    """The step of RUN's newest `checkpoint_<step>` folder (the one a resumed run starts from), 0 if none."""
    try:
        names = [posixpath.basename(e.rstrip("/")) for e in store.fs.ls(store.path(""), detail=False)]
    except FileNotFoundError:
        return 0
    steps = [int(n[len("checkpoint_"):]) for n in names if n.startswith("checkpoint_") and n[len("checkpoint_"):].isdigit()]
    return max(steps, default=0)


def data_order_seed(seed: int, resume_step: int) -> int:
    """The seed of the training stream's shard order: from --seed, and from the step a resumed run starts at.

    Each job shuffles its shards (files) with it through Ray Data's seeded, re-seeded-every-execution
    shuffles, so every epoch reads the shards in a new order (a sorted corpus is not read sorted) and
    the same command reads the same orders. A resumed run does not know where in its epoch it stopped
    (the data position is not in the checkpoint); seeding by its step at least starts it on an order
    of its own rather than replaying the first run's first epoch from the top.
    """
    return (seed * 1_000_003 + resume_step) % 2**31


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


def latest_model_file(run: str | os.PathLike) -> Path:
    """A local run folder's model: RUN/model.safetensors when finished, else the newest checkpoint's EMA."""
    root = Path(run)
    if (root / MODEL_FILE).is_file():
        return root / MODEL_FILE
    found = sorted(root.glob(f"checkpoint_*/{MODEL_FILE}"))
    if not found:
        raise FileNotFoundError(f"no {MODEL_FILE} in run folder {root} or its checkpoints")
    return found[-1]
