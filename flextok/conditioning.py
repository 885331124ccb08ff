"""Conditions of the generators: the class and text embedders, each owning its classifier-free-guidance drop.

Owns: the class table with its null class, the projection of text-encoder states with a learned null
prefix, and the CFG drop of both (which rows become the null condition, drawn from a
`torch.Generator`). Does not own text encoding (`flextok.text_encoder`) nor the GPT
(`flextok.gpt`); `flextok.generator` puts them together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

TextCondition = tuple[torch.Tensor, torch.Tensor]
Condition = torch.Tensor | Sequence[int] | Sequence[str] | TextCondition


def _drop_rows(batch_size: int, prob: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """(B,) bool: rows whose condition is replaced by the null condition (CFG training)."""
    rand_device = generator.device if generator is not None else device
    return (torch.rand(batch_size, generator=generator, device=rand_device) < prob).to(device)


class ClassEmbedder(nn.Module):
    """Class label -> one prefix embedding; row `num_classes` of the table is the null class."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(
        self, labels: torch.Tensor, *, train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B,) labels -> (B, 1, D); with `train`, each row becomes the null class with `dropout_prob`."""
        if train and self.dropout_prob > 0:
            drop = _drop_rows(labels.shape[0], self.dropout_prob, generator, labels.device)
            labels = torch.where(drop, self.num_classes, labels)
        return self.table(labels)[:, None]  # (B, 1, D)

    def null(self, batch_size: int) -> torch.Tensor:
        labels = torch.full((batch_size,), self.num_classes, device=self.table.weight.device)
        return self.table(labels)[:, None]  # (B, 1, D)


class TextEmbedder(nn.Module):
    """Text-encoder states -> L prefix embeddings and their mask; a learned null prefix for CFG.

    Valid caption tokens are moved to the end of the prefix (padding first), so the last prefix
    slot, whose output predicts token 0, always holds a real caption token, and the result does not
    depend on how much padding a batch had.
    """

    def __init__(self, text_dim: int, dim: int, num_prefix_tokens: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_prefix_tokens, self.dropout_prob = num_prefix_tokens, dropout_prob
        self.proj = nn.Linear(text_dim, dim)
        self.null_prefix = nn.Parameter(torch.empty(num_prefix_tokens, dim))
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.null_prefix, std=0.02)

    def forward(
        self,
        states: torch.Tensor,
        mask: torch.Tensor,
        *,
        train: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, E) states and (B, T) mask -> prefix (B, L, D) and prefix mask (B, L)."""
        B, T, _ = states.shape
        L = self.num_prefix_tokens
        if T > L or mask.shape != (B, T):
            raise ValueError(f"text states must be (B, T<={L}, E) with a (B, T) mask, got {tuple(states.shape)}")
        mask = mask.bool()
        if not mask.any(dim=1).all():
            raise ValueError("every caption needs at least one valid encoder token")
        states = F.pad(states.to(self.proj.weight.dtype), (0, 0, L - T, 0))  # (B, L, E), pad first
        mask = F.pad(mask, (L - T, 0), value=False)  # (B, L)
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # padding first, order kept
        states = states.gather(1, order[..., None].expand_as(states))
        mask = mask.gather(1, order)
        prefix = self.proj(states) * mask[..., None]  # (B, L, D); padded slots are never attended
        if train and self.dropout_prob > 0:
            drop = _drop_rows(B, self.dropout_prob, generator, states.device)
            prefix = torch.where(drop[:, None, None], self.null_prefix.to(prefix.dtype), prefix)
            mask = mask | drop[:, None]
        return prefix, mask

    def null(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self.null_prefix[None].expand(batch_size, -1, -1)  # (B, L, D)
        return prefix, torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
