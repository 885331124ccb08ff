"""Nested dropout: how many registers each sample keeps (the process, not the network).

In training each sample keeps its first k registers, k drawn per sample; the decoder replaces
registers k..K-1 by its learned mask token. At inference a prefix of length k is treated the same.
"""

from __future__ import annotations

import torch


def sample_keep_k(
    batch_size: int,
    num_registers: int,
    mode: str,
    *,
    full_fraction: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B,) int64 in 1..K: uniform over 1..K, or uniform over the powers of two 1, 2, 4, .. <= K
    (K itself is always included). A `full_fraction` share of the samples keeps all K instead: under
    either mode the last registers see a gradient only when k reaches them (register K one sample in
    K under uniform), so a tokenizer can leave them nearly unused."""
    gen_device = generator.device if generator is not None else "cpu"
    if mode == "uniform":
        k = torch.randint(1, num_registers + 1, (batch_size,), generator=generator, device=gen_device)
    elif mode == "pow2":
        choices = [2**i for i in range(num_registers.bit_length()) if 2**i <= num_registers]
        if choices[-1] != num_registers:
            choices.append(num_registers)
        table = torch.tensor(choices, device=gen_device)
        k = table[torch.randint(0, len(choices), (batch_size,), generator=generator, device=gen_device)]
    else:
        raise ValueError(f"unknown nested dropout mode {mode!r}")
    if full_fraction > 0:
        full = torch.rand((batch_size,), generator=generator, device=gen_device) < full_fraction
        k = torch.where(full, torch.full_like(k, num_registers), k)
    return k.to(device) if device is not None else k


def keep_mask(keep_k: torch.Tensor, num_registers: int) -> torch.Tensor:
    """(B,) keep counts -> (B, K) bool, True where the register is kept (position < k)."""
    positions = torch.arange(num_registers, device=keep_k.device)
    return positions.unsqueeze(0) < keep_k.unsqueeze(1)
