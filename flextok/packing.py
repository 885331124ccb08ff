"""Packing variable-length sequences into rows of a fixed token budget (the process, not the network).

Owns: the packing plan (which sequence goes into which row at which offset: first-fit over sequences
sorted by decreasing length), the per-position document ids and positions that restart at every
sequence, the block-diagonal causal attention mask built from them, and the padding waste of a plan.
Does not own: the transformer (`flextok.gpt`, which takes positions and a mask) nor the loss
(`flextok.generator`).

Why: adaptive-length token rows are short on average (FlexTok's point), so a batch padded to its
longest row spends most of its compute on padding. Packed rows carry several sequences; attention
never crosses a sequence boundary and rotary positions restart at 0 for each, so every sequence sees
exactly what it would see alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackPlan:
    """Where every sequence sits: sequence i occupies row `row[i]`, positions offset[i] .. offset[i] + length[i]."""

    row: list[int]
    offset: list[int]
    lengths: list[int]
    num_rows: int
    row_length: int

    @property
    def padding_fraction(self) -> float:
        """Share of the rows' positions that hold no sequence."""
        return 1.0 - sum(self.lengths) / (self.num_rows * self.row_length)

    def pack(self, values: torch.Tensor, fill: float | int) -> torch.Tensor:
        """Per-sequence values (B, T, ...) (position p of sequence i at [i, p]; T >= every length) ->
        packed rows (R, S, ...), `fill` where no sequence is."""
        B, T = values.shape[:2]
        device = values.device
        lengths = torch.tensor(self.lengths, device=device)
        steps = torch.arange(T, device=device)
        valid = steps[None, :] < lengths[:, None]  # (B, T)
        starts = torch.tensor(self.row, device=device) * self.row_length + torch.tensor(self.offset, device=device)
        dest = starts[:, None] + steps[None, :]  # (B, T): flat packed position of each (sequence, position)
        out = values.new_full((self.num_rows * self.row_length, *values.shape[2:]), fill)
        out[dest[valid]] = values[valid]
        return out.view(self.num_rows, self.row_length, *values.shape[2:])

    def doc_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(R, S) int64: the sequence index at each position, -1 where no sequence is."""
        width = max(self.lengths)
        ids = torch.arange(len(self.lengths), device=device)[:, None].expand(-1, width)
        return self.pack(ids, -1)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(R, S) int64: each position's index within its own sequence (0 where no sequence is)."""
        width = max(self.lengths)
        return self.pack(torch.arange(width, device=device)[None].expand(len(self.lengths), -1), 0)


def plan_packing(lengths: Sequence[int], row_length: int) -> PackPlan:
    """First-fit decreasing: the longest sequences first, each into the first row with room."""
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"sequences need at least one position, got lengths {lengths[:8]}")
    if max(lengths) > row_length:
        raise ValueError(f"a sequence of {max(lengths)} positions does not fit rows of {row_length}")
    free: list[int] = []  # free positions per row
    row, offset = [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        r = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if r is None:
            free.append(row_length)
            r = len(free) - 1
        row[i], offset[i] = r, row_length - free[r]
        free[r] -= lengths[i]
    return PackPlan(row=row, offset=offset, lengths=lengths, num_rows=len(free), row_length=row_length)


def packed_attention_mask(doc_ids: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(R, S) document ids (-1 = padding) -> (R, 1, S, S) bool: causal within a document, nothing across.

    `key_valid` (R, S) False hides a key (a padded condition slot) from every other query. Every
    position sees at least itself, so no softmax row is empty (padding attends only to itself).
    """
    S = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (R, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    mask = same & causal
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    return (mask | torch.eye(S, dtype=torch.bool, device=doc_ids.device))[:, None]
