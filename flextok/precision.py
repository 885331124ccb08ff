"""Numeric precision of inference: one name per setting and one context manager that applies it.

Owns: the precision names, the autocast dtype they mean, and the CUDA TF32 switches.
Does not own: where fp32 is kept inside the models (each module documents its own: the non-affine
LayerNorms and FSQ always compute in fp32, the flow time and the Euler state stay fp32, APG projects
in float64), nor training precision (the trainer's bf16 autocast).

| name | weights | matmuls                          | use |
|------|---------|----------------------------------|-----|
| fp32 | fp32    | fp32 (TF32 off)                  | reference; tokens reproducible across hardware |
| tf32 | fp32    | TF32 tensor cores on CUDA        | ~fp32 tokens at several times the speed on Ampere+ |
| bf16 | fp32    | bf16 autocast                    | fastest; changes a few % of tokens |
| fp16 | fp32    | fp16 autocast                    | fast; changes fewer tokens than bf16 |

On CPU `tf32` is the same as `fp32` (no TF32 there), and bf16/fp16 autocast run but are slow on
CPUs without AMX; they exist on CPU so that every path is testable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`auto` is bf16 on CUDA and fp32 elsewhere (CPU bf16 is slow without AMX); others pass through."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return check_precision(precision)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype activations are computed in: the autocast dtype, or fp32."""
    return AUTOCAST_DTYPES.get(check_precision(precision), torch.float32)


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the enclosed inference at `precision` on `device` (restores the TF32 switches after)."""
    check_precision(precision)
    device_type = torch.device(device).type
    with contextlib.ExitStack() as stack:
        if device_type == "cuda":
            stack.enter_context(_cuda_tf32(precision == "tf32"))
        if precision in AUTOCAST_DTYPES:
            stack.enter_context(torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[precision]))
        yield


@contextlib.contextmanager
def _cuda_tf32(enabled: bool) -> Iterator[None]:
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision = conv.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
