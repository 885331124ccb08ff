"""`torch.compile` of the transformer blocks, with a fallback to eager where compile cannot run.

Owns: which modules are compiled (every encoder, decoder and GPT block: the trunks hold nearly all
FLOPs and all the elementwise traffic — fp32 LayerNorm round trips, QK-norm, SwiGLU, adaLN
modulation — that compile fuses) and the one-time check that compile works on this machine.
Does not own: training-time compile of wrapped (DDP/FSDP) models, which the trainer applies itself.

Blocks are compiled in place (`nn.Module.compile`), so state dicts, checkpoints and hooks keep their
plain names (no `_orig_mod.` prefix). Compiling is lazy: the first forward of each new input shape
pays the compile time (tens of seconds on CPU, seconds on GPU); later calls reuse it.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def compile_available() -> bool:
    """Whether torch.compile works here (it needs a C++ compiler on CPU, Triton on CUDA): one tiny
    function compiled and run once per process."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2, dynamic=False)
        fn(torch.ones(4))
    except Exception as e:  # compile failures surface as many exception types (backend, codegen, OS)
        log.warning("torch.compile is unavailable here (%s: %s); running eager", type(e).__name__, e)
        return False
    return True


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The trunk blocks of a FlexTok tokenizer or a generator, in module order."""
    from flextok.gpt import Block as GPTBlock
    from flextok.layers import AdaLNBlock, Block

    return [m for m in model.modules() if isinstance(m, (Block, AdaLNBlock, GPTBlock))]


def compile_blocks(model: nn.Module, *, mode: str | None = None) -> int:
    """Compile every transformer block of `model` in place; returns how many were compiled (0 when
    compile is unavailable: the model then runs eager, unchanged)."""
    if not compile_available():
        return 0
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(mode=mode)
    return len(blocks)
