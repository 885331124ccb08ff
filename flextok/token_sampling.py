"""Sampling token sequences from a generator: one id per row from logits, and the autoregressive loop.

Owns: drawing ids from logits (temperature, top-k, top-p; one torch.Generator per row if asked), and
`generate_tokens`, the loop `Generator.generate` runs: classifier-free guidance with conditional and
unconditional rows batched, the KV cache, and end-of-sequence stopping (finished rows leave the batch,
its prefix and its cache; the rest of a row is PAD_ID). Does not own the network (`flextok.gpt`) nor
the conditions (`flextok.conditioning`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flextok.conditioning import Condition
    from flextok.generator import Generator

PAD_ID = -1  # what `generate` puts after a sequence's end (EOS generators); detokenize skips it


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


@torch.inference_mode()
def generate_tokens(
    model: Generator,
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
    """`Generator.generate` (see there): token sequences (B, num_tokens) sampled coarse to fine."""
    num_tokens = model.config.max_tokens if num_tokens is None else int(num_tokens)
    if not 1 <= num_tokens <= model.config.max_tokens:
        raise ValueError(f"num_tokens must be in 1..{model.config.max_tokens}, got {num_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
    prefix, prefix_mask = model.embed_condition(cond)
    B = prefix.shape[0]
    per_row = isinstance(generator, (list, tuple))
    if per_row and len(generator) != B:
        raise ValueError(f"{len(generator)} generators for {B} conditions")
    if cfg_scale is not None:  # rows [cond ; uncond], one forward for both
        null_prefix, null_mask = model.null_condition(B)
        prefix = torch.cat([prefix, null_prefix.to(prefix.dtype)])  # (2B, L, D)
        if prefix_mask is not None:
            prefix_mask = torch.cat([prefix_mask, null_mask])  # (2B, L)
    eos = model.config.eos_id
    out = torch.full((B, num_tokens), PAD_ID, dtype=torch.long, device=prefix.device)
    active = torch.arange(B, device=prefix.device)  # rows of `out` still generating
    twice = (lambda x: x) if cfg_scale is None else (lambda x: torch.cat([x, x]))  # noqa: E731
    if use_kv_cache:
        logits, cache = model.gpt.prefill(prefix, prefix_mask, num_tokens=num_tokens)
    for j in range(num_tokens):
        if not use_kv_cache:
            inputs = twice(out[active, :j])
            logits = model.gpt.next_token_logits(prefix, inputs, prefix_mask)
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
            logits = model.gpt.decode_step(twice(step), cache)
    return out
