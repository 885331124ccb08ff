"""One worker's training state and step (`Trainer`): model, optimiser, EMA, noise stream, save/load.

No Ray: the worker loop (`training.loop`) wraps it, and tests drive it directly in one process.
The task it trains is a `TrainTask` (`training.tasks`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flextok.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.optim import EMA, build_optimizer, load_optimizer_tensors, lr_at, optimizer_tensors
from training.runs import MODEL_FILE, STATE_FILE, STATE_KIND
from training.settings import TrainConfig
from training.tasks import TrainTask


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
