"""Memory plan: per-GPU memory of a training run, counted on the meta device before anything launches.

Static memory from the parameter counts (fp32 master weights, fp32 gradients (and DDP's buckets),
AdamW's two fp32 moments, the fp32 EMA), divided over the workers under "fsdp" (plus the bf16 copies FSDP all-gathers: the root's
parameters and two blocks, the one computing and the one prefetched). Activations by running one
micro-batch's forward pass on the meta device in bf16 and adding up the bytes autograd saves for the
backward pass, attributed to the block that saved them: with activation checkpointing a block keeps
only its input, and one block's activations are alive again while it is recomputed. Attention is
counted as the flash / memory-efficient SDPA kernels on GPUs keep it (q, k, v, the output and a
logsumexp per query), not as the math kernel's (T, T) score matrices the meta device would run.

Not counted: the CUDA context and allocator fragmentation (budget ~2-4 GB per GPU), NCCL buffers,
the data loader's pinned batches, the temporary buffers of the loss.
"""

from __future__ import annotations

import unittest.mock
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.tasks import TrainTask

GB = 1e9
MASTER_BYTES, GRAD_BYTES, ADAM_BYTES, EMA_BYTES, COMPUTE_BYTES = 4, 4, 8, 4, 2


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU (the most loaded one: rank 0 under ddp, which also holds the EMA)."""

    strategy: str
    world_size: int
    micro_batch: int
    activation_checkpointing: bool
    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    ema: float
    gathered: float  # fsdp: all-gathered bf16 parameters in flight
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema + self.gathered + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def _count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class _FlashLikeAttention(torch.autograd.Function):
    """What a fused attention kernel saves for backward: q, k, v, the output and a per-row logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan makes no backward pass
        raise NotImplementedError


def _flash_like_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _FlashLikeAttention.apply(q, k, v)


def activation_bytes(task: TrainTask, model: nn.Module, batch: Any) -> tuple[float, list[float], list[float]]:
    """One forward pass on the meta device -> (bytes saved outside blocks, per block saved, per block input)."""
    blocks = task.blocks(model)
    owner: dict[int, int] = {}
    for i, block in enumerate(blocks):
        owner[id(block)] = i
    current: list[int] = []
    saved = [0.0] * len(blocks)
    inputs = [0.0] * len(blocks)
    outside = [0.0]
    # Weights saved for backward are parameters, counted in the static memory, not activations.
    seen: set[int] = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    def enter(block, args, kwargs):
        i = owner[id(block)]
        current.append(i)
        first = args[0] if args else next(iter(kwargs.values()))
        inputs[i] += first.numel() * first.element_size()

    def leave(block, args, kwargs, output):
        current.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata in seen:  # the same memory saved by several ops (or a view of it) counts once
            return t
        seen.add(storage._cdata)
        nbytes = storage.nbytes()
        if current:
            saved[current[-1]] += nbytes
        else:
            outside[0] += nbytes
        return t

    handles = [b.register_forward_pre_hook(enter, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(leave, with_kwargs=True) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                unittest.mock.patch.object(F, "scaled_dot_product_attention", _flash_like_sdpa):
            task.loss(model, batch, None)
    finally:
        for h in handles:
            h.remove()
    return outside[0], saved, inputs


def memory_plan(task: TrainTask, *, strategy: str, world_size: int, micro_batch: int,
                activation_checkpointing: bool) -> MemoryPlan:
    """Per-GPU memory of training `task` (bf16 compute on GPUs), counted on the meta device."""
    meta = torch.device("meta")
    with meta:
        model = task.build_model(meta)
    total, trainable = _count(model), _count(model, trainable_only=True)
    blocks = task.blocks(model)
    shard = world_size if strategy == "fsdp" else 1
    block_params = max((_count(b) for b in blocks), default=0)
    root_params = total - sum(_count(b) for b in blocks)
    gathered = (root_params + 2 * block_params) * COMPUTE_BYTES if strategy == "fsdp" else 0.0
    outside, saved, inputs = activation_bytes(task, model.to(torch.bfloat16), task.example_batch(micro_batch, meta))
    if activation_checkpointing:
        activations = outside + sum(inputs) + max(saved, default=0.0)
    else:
        activations = outside + sum(saved)
    return MemoryPlan(
        strategy=strategy, world_size=world_size, micro_batch=micro_batch,
        activation_checkpointing=activation_checkpointing, parameters=total, trainable=trainable,
        # DDP keeps its all-reduce buckets beside the gradients (a second fp32 copy: Ray's prepare_model
        # does not set gradient_as_bucket_view).
        weights=total * MASTER_BYTES / shard, gradients=trainable * GRAD_BYTES * (1 if strategy == "fsdp" else 2) / shard,
        optimizer=trainable * ADAM_BYTES / shard, ema=total * EMA_BYTES / shard, gathered=gathered,
        activations=activations,
    )


def largest_micro_batch(task: TrainTask, *, strategy: str, world_size: int, activation_checkpointing: bool,
                        gpu_bytes: float, reserve: float = 4 * GB) -> int:
    """The most rows per GPU that fit `gpu_bytes` minus `reserve` (activations grow linearly in rows)."""
    one = memory_plan(task, strategy=strategy, world_size=world_size, micro_batch=1,
                      activation_checkpointing=activation_checkpointing)
    free = gpu_bytes - reserve - (one.total - one.activations)
    return max(0, int(free // one.activations)) if one.activations > 0 else 0
