"""Run-time training settings (`TrainConfig`): steps, batch, optimiser, cadence, resources.

Owns the values a run is started with and which of them a resume must repeat. Does not own the
architecture (the model configs in `flextok/`) or flags (`jobs/`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("ddp", "fsdp")


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
    strategy: str = "ddp"  # "ddp" (replicated) or "fsdp" (FSDP2: parameters, gradients, AdamW and EMA sharded)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size / num_workers / grad_accum each)
    compile: bool = False  # torch.compile each block
    peak_tflops: float | None = None  # per device, for MFU (default: known GPUs by name; none on CPUs)

    # A re-run resumes only with the same values of these (the optimisation would differ otherwise).
    RESUME_KEYS = ("max_steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                   "beta1", "beta2", "grad_clip", "ema_decay", "seed", "shuffle_buffer")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.grad_accum < 1 or self.batch_size % (self.num_workers * self.grad_accum):
            raise ValueError(f"batch size {self.batch_size} does not split evenly over {self.num_workers} workers x "
                             f"{self.grad_accum} accumulation steps")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= 0, or -1 for unlimited retries, got {self.max_failures}")
        for name in ("warmup_steps", "grid_every", "shuffle_buffer"):
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
        """Rows one worker contributes to one optimizer step."""
        return self.batch_size // self.num_workers

    @property
    def micro_batch_size(self) -> int:
        """Rows in one forward/backward pass (`worker_batch_size / grad_accum`)."""
        return self.worker_batch_size // self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
