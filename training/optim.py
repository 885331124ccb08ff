"""Optimiser and schedule: AdamW (decay on matrices only), warm-up + cosine, flat optimiser state, EMA.

Does not own the step itself (`training.trainer`) or where state is written (`training.runs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from flextok.checkpoint import CheckpointError
from training.settings import TrainConfig


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
    """An exponential moving average of a model's weights, kept in a second copy of the model.

    Under FSDP the copy is sharded like the model, and each worker averages its own shards.
    """

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
        # One fused pass over all tensors (foreach), on the local shards of DTensors.
        torch._foreach_lerp_([_local(e) for e, _ in self._pairs], [_local(p.detach()) for _, p in self._pairs],
                             1.0 - decay)
        if self._copied:
            torch._foreach_copy_([_local(e) for e, _ in self._copied], [_local(b) for _, b in self._copied])


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
