"""Class- and text-conditional generators: the autoregressive process around the GPT network.

Owns: the condition embedders (a class table with a null class; a projection of text-encoder states
with a learned null prefix; each owns its CFG drop), the next-token loss over ragged token
sequences, sampling (temperature, top-k, top-p, classifier-free guidance with conditional and
unconditional rows batched, KV cache), and checkpoints with their provenance (the tokenizer a
generator was trained on, its text encoder).
Does not own: the transformer (`flextok.gpt`), text encoding (`flextok.text_encoder`), nor turning
tokens into images (the tokenizer's `detokenize`).

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
from flextok.gpt import GPT, GPTConfig
from flextok.packing import packed_attention_mask, plan_packing
from flextok.text_encoder import TextEncoder, load_text_encoder

CHECKPOINT_KIND = "Generator"
IGNORE_INDEX = -100  # target value of padding in ragged token batches
PAD_ID = -1  # what `generate` puts after a sequence's end (EOS generators); detokenize skips it

TextCondition = tuple[torch.Tensor, torch.Tensor]
Condition = torch.Tensor | Sequence[int] | Sequence[str] | TextCondition


@dataclass(frozen=True)
class PackedLoss:
    """`Generator.forward_packed`'s result."""

    loss: torch.Tensor  # () mean over every target of the batch, as `forward` returns
    per_sequence: torch.Tensor  # (B,) each sequence's mean loss
    padding_fraction: float  # share of the packed positions that held no sequence
    num_rows: int


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


def token_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) ids from `generate` -> (B,) tokens per row (entries before the first PAD_ID)."""
    return (tokens >= 0).sum(dim=1)


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Draw one id per row from logits (B, V); temperature 0 is greedy (argmax).

    With top-k or top-p the draw runs over the sorted candidates only (B, k), which is much cheaper
    than a draw over a 64,000-entry vocabulary. `generator` may be one per row (a list of B): row i's
    draw then depends on its own generator only, whatever else is in the batch.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != logits.shape[0]:
            raise ValueError(f"{len(generator)} generators for {logits.shape[0]} rows")
        return torch.cat([sample_logits(logits[i : i + 1], temperature=temperature, top_k=top_k, top_p=top_p,
                                        generator=g) for i, g in enumerate(generator)])
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    ids = None  # candidate ids, sorted by decreasing logit; None: the whole vocabulary in order
    if top_k is not None and top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, top_k, dim=-1)  # (B, k)
    if top_p is not None and top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # mass before this id already exceeds top_p
        logits = logits.masked_fill(outside, float("-inf"))
    choice = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # (B, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(1)


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
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the real tokens of a ragged batch.

        Args:
            tokens: (B, T) ids (negative = padding after a row's tokens) or a list of 1D id tensors
                of lengths 1..K (coarse-to-fine prefixes of any length). With `use_eos`, every row
                shorter than K is also taught to end: the target after its last token is EOS.
            cond: B conditions; in training mode each is replaced by the null one with
                `config.cond_dropout_prob`, drawn from `generator`.
        """
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
    ) -> PackedLoss:
        """`forward`'s loss with the sequences packed into rows of `row_length` positions (default: the
        longest sequence) instead of padded to the longest: the same value, less padding.

        Each sequence is its condition prefix and its token inputs (L + n - 1 positions); attention
        never crosses a sequence boundary and rotary positions restart per sequence
        (`flextok.packing`). The CFG drop uses `generator` as `forward` does.
        """
        prefix, prefix_mask = self.embed_condition(cond, train=self.training, generator=generator)
        targets = self._targets(tokens, prefix)  # (B, T)
        B, L = prefix.shape[:2]
        inputs = torch.cat([prefix, self.gpt.tok_emb(targets[:, :-1].clamp(min=0)).to(prefix.dtype)], 1)  # (B, L+T-1, D)
        seq_targets = F.pad(targets, (L - 1, 0), value=IGNORE_INDEX)  # (B, L+T-1): position p predicts this
        lengths = L - 1 + (targets != IGNORE_INDEX).sum(dim=1)  # (B,) positions per sequence
        plan = plan_packing(lengths.tolist(), row_length or int(lengths.max()))
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
    @torch.inference_mode()
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
        num_tokens = self.config.max_tokens if num_tokens is None else int(num_tokens)
        if not 1 <= num_tokens <= self.config.max_tokens:
            raise ValueError(f"num_tokens must be in 1..{self.config.max_tokens}, got {num_tokens}")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError("need temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
        prefix, prefix_mask = self.embed_condition(cond)
        B = prefix.shape[0]
        per_row = isinstance(generator, (list, tuple))
        if per_row and len(generator) != B:
            raise ValueError(f"{len(generator)} generators for {B} conditions")
        if cfg_scale is not None:  # rows [cond ; uncond], one forward for both
            null_prefix, null_mask = self.null_condition(B)
            prefix = torch.cat([prefix, null_prefix.to(prefix.dtype)])  # (2B, L, D)
            if prefix_mask is not None:
                prefix_mask = torch.cat([prefix_mask, null_mask])  # (2B, L)
        eos = self.config.eos_id
        out = torch.full((B, num_tokens), PAD_ID, dtype=torch.long, device=prefix.device)
        active = torch.arange(B, device=prefix.device)  # rows of `out` still generating
        twice = (lambda x: x) if cfg_scale is None else (lambda x: torch.cat([x, x]))  # noqa: E731
        if use_kv_cache:
            logits, cache = self.gpt.prefill(prefix, prefix_mask, num_tokens=num_tokens)
        for j in range(num_tokens):
            if not use_kv_cache:
                inputs = twice(out[active, :j])
                logits = self.gpt.next_token_logits(prefix, inputs, prefix_mask)
            if cfg_scale is not None:
                cond_logits, uncond_logits = logits.float().chunk(2)
                logits = cond_logits + (cfg_scale - 1.0) * (cond_logits - uncond_logits)
            if eos is not None and j == 0:  # every sequence holds at least one token
                logits = logits.float().index_fill(-1, torch.tensor([eos], device=logits.device), float("-inf"))
            rows_gen = [generator[i] for i in active.tolist()] if per_row else generator
            step = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=rows_gen)
            if eos is not None:
                going = step != eos  # (n,)
                out[active[going], j] = step[going]
                if not bool(going.all()):  # finished rows leave the batch, its prefix and its cache
                    active, step, keep = active[going], step[going], twice(going)
                    prefix = prefix[keep]
                    prefix_mask = prefix_mask[keep] if prefix_mask is not None else None
                    if use_kv_cache:
                        cache.select(keep)
                    if active.numel() == 0:
                        break
            else:
                out[:, j] = step
            if use_kv_cache and j + 1 < num_tokens:
                logits = self.gpt.decode_step(twice(step), cache)
        return out

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
