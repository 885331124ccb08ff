"""Finite scalar quantisation (Mentzer et al., 2023): no learned parameters.

Owns: bounding, rounding with a straight-through gradient, codes <-> token ids.
Codes are in [-1, 1]; token id = sum_i digit_i * basis_i with basis = cumulative product of levels.
"""

from __future__ import annotations

import torch
from torch import nn

from flextok.config import FSQConfig


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    def __init__(self, config: FSQConfig) -> None:
        super().__init__()
        self.config = config
        levels = torch.tensor(config.levels, dtype=torch.int64)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), levels[:-1]]), dim=0)
        # Non-persistent: derived from the config, so never part of a checkpoint.
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _half_width(self) -> torch.Tensor:
        return (self.levels // 2).float()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash each dim into [-L/2, L/2] so that rounding yields exactly L values.

        tanh(z + shift) * h - offset with half-width h = (L - 1)(1 + bound_eps)/2; even level counts
        get a half-step offset (so the L integers are -L/2 .. L/2 - 1) and a shift atanh(offset / h)
        that maps z = 0 to 0. With bound_eps > 0 (the release's 1e-3) the ratio is below 1 for every L.
        """
        eps = self.config.bound_eps
        levels = self.levels.float()
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        ratio = offset / half_l
        if eps < 0:  # pre-convention checkpoints: for L = 2 the ratio exceeds 1, where they capped it
            ratio = ratio.clamp(max=0.99)
        return torch.tanh(z + torch.atanh(ratio)) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) continuous -> (..., d) codes in [-1, 1], straight-through gradient."""
        z = z.float()
        return round_ste(self.bound(z)) / self._half_width()

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) codes -> (...) int64 token ids."""
        digits = (codes.float() * self._half_width() + self._half_width()).round().long()
        return (digits * self.basis).sum(dim=-1)

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...) token ids -> (..., d) fp32 codes in [-1, 1]."""
        tokens = tokens.long()
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), got {tokens.min()}..{tokens.max()}")
        digits = (tokens.unsqueeze(-1) // self.basis) % self.levels  # (..., d)
        half = self._half_width()
        return (digits.float() - half) / half

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., d) -> (codes (..., d) with STE gradient, tokens (...))."""
        codes = self.quantize(z)
        return codes, self.codes_to_tokens(codes.detach())
