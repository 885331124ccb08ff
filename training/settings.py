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
    checkpoint_minutes: float | None = None  # also a checkpoint when this much wall-clock time has passed
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
    # Token-budget batches (generators): positions per optimizer step over all workers instead of
    # `batch_size` rows, spent by `batching` (`training.batching`: bucketed, packed or padded; default bucketed).
    token_budget: int | None = None
    batching: str | None = None
    pack_length: int | None = None  # positions per packed row (default: the longest sequence)

    # A re-run resumes only with the same values of these (the optimisation would differ otherwise).
    RESUME_KEYS = ("max_steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                   "beta1", "beta2", "grad_clip", "ema_decay", "seed", "shuffle_buffer", "token_budget",
                   "batching", "pack_length")

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
        if self.checkpoint_minutes is not None and not (isinstance(self.checkpoint_minutes, (int, float))
                                                        and 0 < self.checkpoint_minutes < float("inf")):
            raise ValueError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.token_budget is None:
            if self.batching is not None or self.pack_length is not None:
                raise ValueError("batching (packed, bucketed, padded) and pack_length need a token budget")
        else:
            from training.batching import BATCHINGS

            object.__setattr__(self, "batching", self.batching or "bucketed")  # measured faster: BENCHMARKS.md
            if self.batching not in BATCHINGS:
                raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, got {self.batching!r}")
            if self.pack_length is not None and (self.batching != "packed" or self.pack_length < 1):
                raise ValueError("pack_length (>= 1) is for packed batches")
            if self.token_budget < 1 or self.token_budget % (self.num_workers * self.grad_accum):
                raise ValueError(f"token budget {self.token_budget} does not split evenly over {self.num_workers} "
                                 f"workers x {self.grad_accum} accumulation steps")

    @property
    def worker_batch_size(self) -> int:
        """Rows one worker contributes to one optimizer step."""
        return self.batch_size // self.num_workers

    @property
    def micro_batch_size(self) -> int:
        """Rows in one forward/backward pass (`worker_batch_size / grad_accum`)."""
        return self.worker_batch_size // self.grad_accum

    @property
    def micro_token_budget(self) -> int | None:
        """Positions in one forward/backward pass (`token_budget / num_workers / grad_accum`)."""
        return None if self.token_budget is None else self.token_budget // (self.num_workers * self.grad_accum)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
