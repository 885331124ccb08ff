"""One worker's training state and step (`Trainer`): model, optimiser, EMA, noise stream, save/load.

Two strategies. "ddp": every worker holds the whole model and AdamW state (DDP all-reduces the
gradients), the main worker the EMA, and checkpoints are written by the main worker alone (one
`train_state.safetensors`). "fsdp": FSDP2 `fully_shard` on every transformer block and at the root,
so parameters, gradients, AdamW moments and the EMA are sharded over the workers; on GPUs compute
runs in bf16 with fp32 master weights and fp32 gradient reduction (`MixedPrecisionPolicy`).
Checkpoints are then written by every worker through `torch.distributed.checkpoint` as safetensors
shards (`shards/`, nothing pickled), and the main worker writes the gathered EMA as the single-file
`model.safetensors`. DCP would reshard the tensors onto another world size, but the data position is
per worker: the driver refuses such a resume (`training.data.check_world_size`).

No Ray: the worker loop (`training.loop`) wraps it, and tests drive it directly in one process.
The task it trains is a `TrainTask` (`training.tasks`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flextok.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.optim import EMA, build_optimizer, load_optimizer_tensors, lr_at, optimizer_tensors
from training.runs import MODEL_FILE, SHARD_DIR, STATE_FILE, STATE_KIND, TRAIN_STATE_FILE
from training.settings import TrainConfig
from training.tasks import TrainTask


def _autocast(device: torch.device):
    """bf16 autocast on GPUs; CPUs train in fp32 (bf16 is ~5x slower than fp32 there, DESIGN §6)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_blocks(blocks: list[nn.Module], *, activation_checkpointing: bool, compile: bool) -> None:
    """Per-block activation checkpointing and torch.compile, in place (parameter names do not change)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if activation_checkpointing:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if compile:
            block.compile()


def shard_model(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> None:
    """FSDP2: one `fully_shard` unit per block, then the root (embeddings, heads, norms, frozen parts).

    On GPUs: bf16 parameters in forward/backward, fp32 gradient reduction; the sharded parameters the
    optimizer updates stay fp32. On CPUs everything stays fp32 (DESIGN §6).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a worker's noise at an optimizer step: a pure function, so resuming repeats it exactly."""
    return (seed * 1_000_003 + rank * 7919 + step * 104_729) % 2**63


def _scalar(t: torch.Tensor) -> torch.Tensor:
    """A reduced scalar as a plain tensor (a DTensor's full value: a collective, not a host sync)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class Trainer:
    """One worker's model, optimizer, EMA and step counter.

    Args:
        wrap: turns the model into what the loss runs under "ddp" (DDP from
            `ray.train.torch.prepare_model`); None runs the model itself (one process, tests, the
            benchmark's bare loop). Under "fsdp" in a process group the model is sharded instead.
        is_main: the worker that logs and writes the single-file model (rank 0).
    """

    def __init__(
        self, task: TrainTask, cfg: TrainConfig, device: torch.device, *, is_main: bool = True,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.task, self.cfg, self.device, self.is_main = task, cfg, torch.device(device), is_main
        self.sharded = cfg.strategy == "fsdp" and dist.is_available() and dist.is_initialized()
        torch.manual_seed(cfg.seed)  # the same init on every worker (DDP also broadcasts rank 0's)
        self.model = task.build_model(self.device).train()
        prepare_blocks(task.blocks(self.model), activation_checkpointing=cfg.activation_checkpointing,
                       compile=cfg.compile)
        if self.sharded:
            shard_model(self.model, task.blocks(self.model), self.device)
            self.module = self.model
        else:
            self.module = wrap(self.model) if wrap is not None else self.model
        self.optimizer, self.param_names = build_optimizer(self.model, cfg, self.device)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema: EMA | None = None
        if self.sharded:  # every worker holds its shard of the EMA, laid out like its parameters
            shadow = task.build_model(self.device)
            shard_model(shadow, task.blocks(shadow), self.device)
            self.ema = EMA(self.model, shadow, cfg.ema_decay)
        elif is_main:
            self.ema = EMA(self.model, task.build_model(self.device), cfg.ema_decay)
        self._gathered_ema: nn.Module | None = None  # fsdp: the main worker's full copy, see `gather_ema`
        self._gathered_step = -1
        self.step = 0
        self.items_seen = 0
        self.train_seconds = 0.0
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        self.data_position: dict[str, Any] | None = None  # every worker's, set by the loop before `save`
        self.rng = torch.Generator(device=self.device)
        self.rank = 0

    def reseed(self, rank: int) -> None:
        """This worker's rank: its noise (nested dropout, flow times, CFG drop) is drawn from `noise_seed`."""
        self.rank = rank

    def _sync_gradients(self, enabled: bool):
        """Gradient all-reduce only on an update's last micro-batch."""
        if self.sharded:
            self.model.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if not enabled and hasattr(self.module, "no_sync"):
            return self.module.no_sync()
        return contextlib.nullcontext()

    def train_step(self, *micro_batches: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer update on one or more prepared micro-batches (gradients averaged over them)
        -> (mean loss, grad norm) as tensors (no host sync), lr."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Seeded by (seed, rank, step), not carried over: a resumed run draws the same noise at every step.
        self.rng.manual_seed(noise_seed(self.cfg.seed, self.rank, self.step))
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        weights = self._loss_weights(micro_batches)
        for i, batch in enumerate(micro_batches):
            with self._sync_gradients(i == len(micro_batches) - 1), _autocast(self.device):
                loss = self.task.loss(self.module, batch, self.rng)
                (loss * weights[i]).backward()
            total += loss.detach().float() * weights[i]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = _scalar(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        return total, grad_norm.detach().float(), lr

    def _loss_weights(self, micro_batches: tuple[Any, ...]) -> torch.Tensor:
        """(M,) weights of the micro-batches' mean losses, so that the step's gradient is that of the mean
        over every loss target of the step on all workers (variable-length and token-budget batches hold
        different numbers of targets). The workers' gradients are averaged (DDP, FSDP): a worker's weights
        are its share of the targets times the world size. Equal weights 1/M when the task counts none."""
        counts = [self.task.loss_weight(b) for b in micro_batches]
        if any(c is None for c in counts):
            return torch.full((len(micro_batches),), 1.0 / len(micro_batches), device=self.device)
        counts_t = torch.tensor(counts, dtype=torch.float32).to(self.device, non_blocking=True)  # (M,)
        total = counts_t.sum()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:  # a collective, no host sync
            dist.all_reduce(total)
        return counts_t * world / total

    @property
    def ema_model(self) -> nn.Module:
        """The main worker's plain EMA model (grids, validation, export); under fsdp as of `gather_ema`."""
        model = self._gathered_ema if self.sharded else (self.ema.model if self.ema is not None else None)
        assert model is not None, "only the main worker holds a whole EMA model (fsdp: call gather_ema first)"
        return model

    def gather_ema(self) -> None:
        """fsdp: all-gather the EMA shards into the main worker's plain copy. A collective: every worker calls it."""
        if not self.sharded or self._gathered_step == self.step:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        assert self.ema is not None
        full = get_model_state_dict(self.ema.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            if self._gathered_ema is None:
                self._gathered_ema = self.task.build_model(self.device).eval().requires_grad_(False)
            self._gathered_ema.load_state_dict(full, strict=True)
        self._gathered_step = self.step

    def _state(self) -> dict[str, Any]:
        state = {"step": self.step, "items_seen": self.items_seen, "train_seconds": round(self.train_seconds, 3),
                 "loss": self.last_loss, "val_loss": self.val_loss}
        if self.data_position is not None:
            state["data_position"] = self.data_position
        return state

    def _set_state(self, state: Mapping[str, Any]) -> None:
        self.step, self.items_seen = int(state["step"]), int(state["items_seen"])
        self.train_seconds, self.last_loss = float(state["train_seconds"]), state["loss"]
        self.val_loss = state.get("val_loss")
        self.data_position = state.get("data_position")

    def save(self, folder: Path) -> None:
        """Write a checkpoint into `folder`: ddp on the main worker only; fsdp on every worker (a collective)."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.sharded:
            self._save_sharded(folder)
            return
        assert self.ema is not None, "only the main worker holds the EMA and writes checkpoints"
        self.task.save_pretrained(self.ema.model, folder / MODEL_FILE, step=self.step)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"optim.{k}": v for k, v in optimizer_tensors(self.optimizer, self.param_names).items()})
        save_checkpoint(folder / STATE_FILE, tensors, kind=STATE_KIND, config=self.cfg.to_dict(),
                        extra={"train_state": json.dumps(self._state()), "task": json.dumps(self.task.describe())})

    def _sharded_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the training state by name (DTensors where sharded): DCP's save/load target."""
        assert self.ema is not None
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.model.state_dict().items()})
        optim = optimizer_tensors(self.optimizer, self.param_names)
        if not optim:  # before the first step AdamW holds no state: load into zeros of the right layout
            params = dict(self.model.named_parameters())
            for name in self.param_names:
                p = params[name]
                optim[f"{name}.step"] = torch.zeros(())
                optim[f"{name}.exp_avg"] = torch.zeros_like(p)
                optim[f"{name}.exp_avg_sq"] = torch.zeros_like(p)
        tensors.update({f"optim.{k}": v for k, v in optim.items()})
        return tensors

    def _save_sharded(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        self.gather_ema()
        if self.is_main:
            self.task.save_pretrained(self._gathered_ema, folder / MODEL_FILE, step=self.step)
            (folder / TRAIN_STATE_FILE).write_text(json.dumps(
                {"train_state": self._state(), "config": self.cfg.to_dict(), "task": self.task.describe()}))
        # Each worker writes its own safetensors shard file; Ray uploads every worker's folder into one.
        dcp.save(self._sharded_tensors(),
                 storage_writer=HuggingFaceStorageWriter(str(folder / SHARD_DIR), save_distributed=True))

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore what `save` wrote (on every worker)."""
        is_sharded_checkpoint = (folder / SHARD_DIR).is_dir()
        if is_sharded_checkpoint != self.sharded:
            written = "fsdp" if is_sharded_checkpoint else "ddp"
            raise ValueError(f"the checkpoint in {folder.name} was written with --strategy {written}; resume with it")
        if self.sharded:
            return self._load_sharded(folder)
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
        self._set_state(state)
        if self.ema is not None:
            ema_state, _ = load_checkpoint(folder / MODEL_FILE)
            self.ema.model.load_state_dict(ema_state, strict=True)
        return state

    def _load_sharded(self, folder: Path) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        assert self.ema is not None
        tensors = self._sharded_tensors()
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / SHARD_DIR)))

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(part("model."), strict=True)
        self.ema.model.load_state_dict(part("ema."), strict=True)
        load_optimizer_tensors(self.optimizer, self.param_names, part("optim."))
        state = json.loads((folder / TRAIN_STATE_FILE).read_text())["train_state"]
        self._set_state(state)
        return state
