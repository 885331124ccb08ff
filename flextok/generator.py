"""Class- and text-conditional generators: the autoregressive process around the GPT network.

Owns: the `Generator` (a GPT with its condition prefix), the next-token loss over ragged token
sequences, padded or packed, and checkpoints with their provenance (the tokenizer a generator was
trained on, its text encoder).
Does not own: the transformer (`flextok.gpt`), the condition embedders and their CFG drop
(`flextok.conditioning`), the sampling loop (`flextok.token_sampling`), text encoding
(`flextok.text_encoder`), nor turning tokens into images (the tokenizer's `detokenize`).

Conditions: a class model takes labels (LongTensor (B,) or a list of ints); a text model takes a
list of captions (encoded by its frozen text encoder) or precomputed `(states (B, T, E), mask (B, T))`
from `TextEncoder.encode`, which is how a training job can cache caption encodings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flextok.checkpoint import (
    CheckpointError,
    check_finite,
    config_from_metadata,
    load_checkpoint,
    save_checkpoint,
)
from flextok.conditioning import ClassEmbedder, Condition, TextEmbedder
from flextok.gpt import GPT, GPTConfig
from flextok.packing import PackPlan, packed_attention_mask, plan_packing
from flextok.text_encoder import TextEncoder, load_text_encoder
from flextok.token_sampling import PAD_ID, generate_tokens, sample_logits, token_lengths

CHECKPOINT_KIND = "Generator"
IGNORE_INDEX = -100  # target value of padding in ragged token batches

__all__ = [  # with what `flextok.conditioning` and `flextok.token_sampling` own, for the callers of this module
    "CHECKPOINT_KIND", "IGNORE_INDEX", "PAD_ID", "ClassEmbedder", "Condition", "Generator", "PackedLoss", "TextEmbedder",
    "append_eos", "pad_tokens", "sample_logits", "token_lengths",
]


@dataclass(frozen=True)
class PackedLoss:
    """`Generator.forward_packed`'s result."""

    loss: torch.Tensor  # () mean over every target of the batch, as `forward` returns
    per_sequence: torch.Tensor  # (B,) each sequence's mean loss
    padding_fraction: float  # share of the packed positions that held no sequence
    num_rows: int


def pad_tokens(tokens: torch.Tensor | Sequence[torch.Tensor], max_tokens: int) -> torch.Tensor:
    """Ragged token sequences -> (B, T) int64, padded with IGNORE_INDEX; a tensor passes through
    (negative entries are padding and must come after a row's tokens)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, T) or a list of 1D tensors, got shape {tuple(tokens.shape)}")
        padded = tokens.long()
    else:
        rows = [torch.as_tensor(t).long().reshape(-1) for t in tokens]
        if not rows:
            raise ValueError("no token sequences given")
        padded = torch.full((len(rows), max(len(r) for r in rows)), IGNORE_INDEX, dtype=torch.long, device=rows[0].device)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
    if not 1 <= padded.shape[1] <= max_tokens:
        raise ValueError(f"token sequences must hold 1..{max_tokens} tokens, got {padded.shape[1]}")
    return padded.where(padded >= 0, IGNORE_INDEX)


def append_eos(targets: torch.Tensor, eos_id: int, max_tokens: int) -> torch.Tensor:
    """(B, T) targets padded with IGNORE_INDEX -> (B, min(T + 1, K)) with EOS right after every row
    shorter than K (a row of K tokens ends at the cap and gets none)."""
    lengths = (targets != IGNORE_INDEX).sum(dim=1)  # (B,)
    width = min(targets.shape[1] + 1, max_tokens)
    out = F.pad(targets, (0, width - targets.shape[1]), value=IGNORE_INDEX)
    short = lengths < max_tokens
    out[short.nonzero().squeeze(1), lengths[short]] = eos_id
    return out


class Generator(nn.Module):
    """A class- or text-conditional GPT over FlexTok tokens (which kind: `config.cond`)."""

    def __init__(
        self,
        config: GPTConfig,
        *,
        text_encoder: TextEncoder | None = None,
        tokenizer_id: str | None = None,
        tokenizer_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        if config.cond == "class":
            self.embedder = ClassEmbedder(config.num_classes, config.dim, config.cond_dropout_prob)
        else:
            self.embedder = TextEmbedder(
                config.text_dim, config.dim, config.num_prefix_tokens, config.cond_dropout_prob
            )
        self.gpt = GPT(config)
        if text_encoder is not None and (config.cond != "text" or text_encoder.dim != config.text_dim):
            raise ValueError(f"text encoder {text_encoder.name!r} does not fit this {config.cond} generator")
        self._text_encoder = text_encoder  # a plain object: frozen, never part of the state dict
        self.tokenizer_id = tokenizer_id
        self.tokenizer_sha256 = tokenizer_sha256

    # Provenance ----------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    @property
    def text_encoder_name(self) -> str | None:
        return self.config.text_encoder

    @property
    def text_encoder(self) -> TextEncoder:
        """The frozen text encoder named in the config, loaded offline on first use."""
        if self.config.cond != "text":
            raise ValueError("a class-conditional generator has no text encoder")
        if self._text_encoder is None:
            device = next(self.parameters()).device
            self._text_encoder = load_text_encoder(
                self.config.text_encoder, max_length=self.config.num_prefix_tokens, device=device
            )
        return self._text_encoder

    def check_tokenizer(self, tok_config: Any) -> None:
        """ValueError unless a tokenizer config has this generator's codebook size and K."""
        if (tok_config.codebook_size, tok_config.num_registers) != (self.codebook_size, self.max_tokens):
            raise ValueError(
                f"generator expects a tokenizer with {self.codebook_size} codes and K={self.max_tokens}, "
                f"got {tok_config.codebook_size} codes and K={tok_config.num_registers}"
            )

    # Conditions ----------------------------------------------------------------------------------
    def embed_condition(
        self, cond: Condition, *, train: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A condition -> prefix (B, L, D) and prefix mask (B, L) (None for classes)."""
        device = next(self.parameters()).device
        if self.config.cond == "class":
            labels = torch.as_tensor(cond, device=device).long().reshape(-1)
            # Checked where it costs no device sync (labels on the CPU). Training on an accelerator
            # checks the dataset's label range before it starts; an id out of range on CUDA is a
            # device-side assert in the embedding in any case.
            on_host = labels.device.type == "cpu"
            if on_host and labels.numel() and not (int(labels.min()) >= 0 and int(labels.max()) < self.config.num_classes):
                raise ValueError(f"class labels must be in [0, {self.config.num_classes})")
            return self.embedder(labels, train=train, generator=generator), None
        if isinstance(cond, tuple) and len(cond) == 2 and isinstance(cond[0], torch.Tensor):
            states, mask = cond
        elif isinstance(cond, Sequence) and all(isinstance(c, str) for c in cond):
            states, mask = self.text_encoder.encode(list(cond))
        else:
            raise TypeError("a text generator takes a list of captions or (states, mask) tensors")
        return self.embedder(states.to(device), mask.to(device), train=train, generator=generator)

    def null_condition(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.config.cond == "class":
            return self.embedder.null(batch_size), None
        return self.embedder.null(batch_size)

    # Training ------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor | Sequence[torch.Tensor],
        cond: Condition,
        generator: torch.Generator | None = None,
        *,
        plan: PackPlan | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the real tokens of a ragged batch.

        Args:
            tokens: (B, T) ids (negative = padding after a row's tokens) or a list of 1D id tensors
                of lengths 1..K (coarse-to-fine prefixes of any length). With `use_eos`, every row
                shorter than K is also taught to end: the target after its last token is EOS.
            cond: B conditions; in training mode each is replaced by the null one with
                `config.cond_dropout_prob`, drawn from `generator`.
            plan: run the sequences packed as this plan places them (`forward_packed`): the same
                loss, computed on the plan's rows. Through `forward` so that DDP and FSDP see the call.
        """
        if plan is not None:
            return self.forward_packed(tokens, cond, generator, plan=plan).loss
        prefix, prefix_mask = self.embed_condition(cond, train=self.training, generator=generator)
        targets = self._targets(tokens, prefix)  # (B, T)
        inputs = targets[:, :-1].clamp(min=0)  # padding never reaches a real target (causality)
        logits = self.gpt(prefix, inputs, prefix_mask)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def _targets(self, tokens: torch.Tensor | Sequence[torch.Tensor], prefix: torch.Tensor) -> torch.Tensor:
        """Ragged rows -> checked (B, T) targets padded with IGNORE_INDEX (EOS appended with `use_eos`)."""
        targets = pad_tokens(tokens, self.config.max_tokens).to(prefix.device)  # (B, T)
        if targets.shape[0] != prefix.shape[0]:
            raise ValueError(f"{targets.shape[0]} token rows but {prefix.shape[0]} conditions")
        if targets.device.type == "cpu":  # no device sync in an accelerator's training step
            if not (targets != IGNORE_INDEX).any():
                raise ValueError("the batch holds no tokens")
            if int(targets.max()) >= self.config.codebook_size:
                raise ValueError(f"token ids must be < codebook_size={self.config.codebook_size}")
        if self.config.use_eos:
            targets = append_eos(targets, self.config.eos_id, self.config.max_tokens)
        return targets

    def forward_packed(
        self,
        tokens: torch.Tensor | Sequence[torch.Tensor],
        cond: Condition,
        generator: torch.Generator | None = None,
        *,
        row_length: int | None = None,
        plan: PackPlan | None = None,
    ) -> PackedLoss:
        """`forward`'s loss with the sequences packed into rows of `row_length` positions (default: the
        longest sequence) instead of padded to the longest: the same value, less padding.

        Each sequence is its condition prefix and its token inputs (L + n - 1 positions); attention
        never crosses a sequence boundary and rotary positions restart per sequence
        (`flextok.packing`). The CFG drop uses `generator` as `forward` does. `plan` (made on the host
        by a batcher, `training.batching`) places the sequences instead of first-fit decreasing here,
        and saves the device sync of reading their lengths.
        """
        prefix, prefix_mask = self.embed_condition(cond, train=self.training, generator=generator)
        targets = self._targets(tokens, prefix)  # (B, T)
        B, L = prefix.shape[:2]
        inputs = torch.cat([prefix, self.gpt.tok_emb(targets[:, :-1].clamp(min=0)).to(prefix.dtype)], 1)  # (B, L+T-1, D)
        seq_targets = F.pad(targets, (L - 1, 0), value=IGNORE_INDEX)  # (B, L+T-1): position p predicts this
        lengths = L - 1 + (targets != IGNORE_INDEX).sum(dim=1)  # (B,) positions per sequence
        if plan is None:
            plan = plan_packing(lengths.tolist(), row_length or int(lengths.max()))
        elif lengths.device.type == "cpu" and plan.lengths != lengths.tolist():  # no device sync on accelerators
            raise ValueError(f"the packing plan is for sequences of {plan.lengths[:8]} positions, the batch has "
                             f"{lengths.tolist()[:8]}")
        key_valid = None
        if prefix_mask is not None:
            keys = torch.cat([prefix_mask, prefix_mask.new_ones(B, inputs.shape[1] - L)], 1)  # (B, L+T-1)
            key_valid = plan.pack(keys, True)
        doc = plan.doc_ids(prefix.device)  # (R, S)
        states = self.gpt.features_packed(plan.pack(inputs, 0.0), plan.positions(prefix.device),
                                          packed_attention_mask(doc, key_valid))
        packed_targets = plan.pack(seq_targets, IGNORE_INDEX)  # (R, S)
        losses = F.cross_entropy(self.gpt.head(states).flatten(0, 1).float(), packed_targets.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none")  # (R * S,)
        counted = packed_targets.flatten() != IGNORE_INDEX
        docs = doc.flatten().clamp(min=0)
        per_sequence = torch.zeros(B, device=losses.device).index_add(0, docs, losses * counted)
        per_sequence = per_sequence / torch.zeros(B, device=losses.device).index_add(0, docs, counted.float())
        return PackedLoss(loss=losses.sum() / counted.sum(), per_sequence=per_sequence,
                          padding_fraction=plan.padding_fraction, num_rows=plan.num_rows)

    # Sampling ------------------------------------------------------------------------------------
    def generate(
        self,
        cond: Condition,
        *,
        num_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        use_kv_cache: bool = True,
    ) -> torch.Tensor:
        """Sample token sequences (B, num_tokens) coarse to fine, num_tokens in 1..K (default K).

        A fixed-length generator fills every row. A generator with an end-of-sequence id stops each
        row where it samples EOS (never before its first token): `num_tokens` is then a cap, the rest
        of the row is PAD_ID (-1; `detokenize` and `token_lengths` read it as the end), and finished
        rows leave the batch and its KV cache, so they cost no more compute.

        Args:
            cfg_scale: None samples conditionally only. A number s runs each condition with the null
                condition in one batch and samples from cond + (s - 1) * (cond - uncond) logits, so
                s = 1 is conditional sampling and s = 0 unconditional.
            temperature: 0 is greedy decoding.
            generator: one torch.Generator for the batch, or one per row (a row's samples then do not
                depend on the rest of the batch: batched generation equals one row at a time).
            use_kv_cache: False recomputes the whole sequence every step (reference and benchmark).
        """
        return generate_tokens(self, cond, num_tokens=num_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               cfg_scale=cfg_scale, generator=generator, use_kv_cache=use_kv_cache)

    # Checkpoints ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
        """Write a safetensors checkpoint: weights, config JSON and provenance metadata (+ `extra`)."""
        extra = {
            **(extra or {}),
            "tokenizer_id": self.tokenizer_id or "",
            "tokenizer_sha256": self.tokenizer_sha256 or "",
            "tokenizer_codebook_size": str(self.codebook_size),
            "tokenizer_max_tokens": str(self.max_tokens),
            "text_encoder": self.text_encoder_name or "",
        }
        return save_checkpoint(path, self.state_dict(), kind=CHECKPOINT_KIND, config=self.config.to_dict(), extra=extra)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        text_encoder: TextEncoder | None = None,
    ) -> Generator:
        """Rebuild a class- or text-conditional generator from its checkpoint (weights on `device`)."""
        state, metadata = load_checkpoint(path, device=device)
        try:
            config = GPTConfig.from_dict(config_from_metadata(metadata, kind=CHECKPOINT_KIND, path=path))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad generator config ({e})") from None
        check_finite(state, path)
        with torch.device("meta"):  # no random init: the weights come from the file
            model = cls(
                config,
                text_encoder=text_encoder,
                tokenizer_id=metadata.get("tokenizer_id") or None,
                tokenizer_sha256=metadata.get("tokenizer_sha256") or None,
            )
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not match the config ({str(e).splitlines()[0]})") from None
        return model.eval()
