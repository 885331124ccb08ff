"""The GPT network over FlexTok token ids: a LlamaGen-like decoder-only transformer.

Owns: `GPTConfig` and its presets, the transformer (RMSNorm, rotary positions, SwiGLU MLP, causal
`scaled_dot_product_attention`), the teacher-forced `forward`, and step-by-step decoding with a KV
cache (`prefill` then `decode_step`).
Does not own: conditioning (class / text embedders and their CFG drop), the loss, sampling and
checkpoints; those are the process around the network, in `flextok.generator`.

Sequence layout: `[prefix ; tokens]`, where the prefix is L condition embeddings (L = 1 for a class,
up to L text-encoder states for a caption) and tokens are FSQ ids embedded by a table. There is no
BOS token: the output at the last prefix position predicts token 0 and the output at token j
predicts token j + 1, so the vocabulary is the codebook (V = codebook_size), plus one end-of-sequence
id (`eos_id` = codebook_size, V = codebook_size + 1) for a generator that decides its own length
(`use_eos`), and the longest sequence the network sees is L + K - 1 (a row of all K tokens ends at
the cap: it needs no EOS). Padding inside the prefix (short captions) is hidden from
every other position by an attention mask; padding of ragged token sequences needs no mask, since
causality keeps it out of every earlier position and the loss ignores it.

Shapes (package glossary, plus): B batch, L prefix (condition) length, T token inputs, S = L + T,
D width, H heads, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flextok.config import (
    DEPTH_LIMIT,
    TOKENS_LIMIT,
    WIDTH_LIMIT,
    check_float_fields,
    check_int_fields,
)
from flextok.text_encoder import DEFAULT_MAX_TEXT_TOKENS, DEFAULT_TEXT_DIM, DEFAULT_TEXT_ENCODER

COND_TYPES = ("class", "text")


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Architecture of a generator: the GPT plus its condition prefix.

    `codebook_size` and `max_tokens` (K) come from the tokenizer (`for_tokenizer`). Class models use
    `num_classes` (one prefix token; one extra null class for CFG); text models use `text_encoder`,
    `text_dim` and `num_prefix_tokens` (the longest caption in encoder tokens). Fields of the other
    condition type stay None; None text fields default to the offline MiniLM encoder. `use_eos` adds
    an end-of-sequence id after the codebook: the generator is trained on variable-length rows and
    stops each sample where it chooses (K at most).
    """

    codebook_size: int = 64_000
    max_tokens: int = 256
    depth: int = 20
    dim: int = 1280
    num_heads: int = 20
    cond: str = "class"
    num_classes: int | None = None
    text_encoder: str | None = None
    text_dim: int | None = None
    num_prefix_tokens: int | None = None
    cond_dropout_prob: float = 0.1
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    use_eos: bool = False

    def __post_init__(self) -> None:
        def fill(name: str, value: Any) -> None:
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

        if self.cond not in COND_TYPES:
            raise ValueError(f"GPTConfig.cond must be one of {COND_TYPES}, got {self.cond!r}")
        check_int_fields(self, {
            "codebook_size": (1, 1 << 20), "max_tokens": (1, TOKENS_LIMIT), "depth": (1, DEPTH_LIMIT),
            "dim": (1, WIDTH_LIMIT), "num_heads": (1, 1024), "num_classes": (1, 1_000_000),
            "text_dim": (1, WIDTH_LIMIT), "num_prefix_tokens": (1, TOKENS_LIMIT),
        }, optional=("num_classes", "text_dim", "num_prefix_tokens"))
        check_float_fields(self, ("cond_dropout_prob", "rope_base", "norm_eps"))
        if not isinstance(self.use_eos, bool):
            raise ValueError(f"GPTConfig.use_eos must be true or false, got {self.use_eos!r}")
        if self.cond == "class":
            if self.text_encoder is not None or self.text_dim is not None:
                raise ValueError("a class-conditional GPTConfig takes no text_encoder / text_dim")
            if self.num_classes is None or self.num_classes < 1:
                raise ValueError(f"a class-conditional GPTConfig needs num_classes >= 1, got {self.num_classes}")
            fill("num_prefix_tokens", 1)
            if self.num_prefix_tokens != 1:
                raise ValueError("a class-conditional GPTConfig uses exactly one prefix token")
        else:
            if self.num_classes is not None:
                raise ValueError("a text-conditional GPTConfig takes no num_classes")
            fill("text_encoder", DEFAULT_TEXT_ENCODER)
            if self.text_encoder == DEFAULT_TEXT_ENCODER:
                fill("text_dim", DEFAULT_TEXT_DIM)
            if not self.text_encoder or self.text_dim is None or self.text_dim < 1:
                raise ValueError("a text-conditional GPTConfig needs a text_encoder name and text_dim >= 1")
            fill("num_prefix_tokens", DEFAULT_MAX_TEXT_TOKENS)
            if self.num_prefix_tokens < 1:
                raise ValueError("GPTConfig.num_prefix_tokens must be >= 1")
        for name in ("codebook_size", "max_tokens", "depth", "dim", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook_size < 2:
            raise ValueError("GPTConfig.codebook_size must be >= 2")
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(
                f"GPTConfig.dim={self.dim} must split into {self.num_heads} heads of even width"
            )
        if not 0.0 <= self.cond_dropout_prob < 1.0:
            raise ValueError("GPTConfig.cond_dropout_prob must be in [0, 1)")
        if self.rope_base <= 1.0 or self.norm_eps <= 0.0:
            raise ValueError("GPTConfig.rope_base must be > 1 and norm_eps > 0")

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Output classes = input ids = the codebook, plus the end-of-sequence id with `use_eos`."""
        return self.codebook_size + int(self.use_eos)

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence id (outside the codebook), or None for a fixed-length generator."""
        return self.codebook_size if self.use_eos else None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """SwiGLU width 8D/3 (three matrices cost what a 4x MLP's two do), rounded up to 64."""
        return 64 * math.ceil(8 * self.dim / 3 / 64)

    @property
    def max_seq_len(self) -> int:
        return self.num_prefix_tokens + self.max_tokens - 1

    # Serialisation and construction --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> GPTConfig:
        """A preset with changes; switching `cond` drops the preset's condition fields."""
        try:
            data = GPT_PRESETS[name].to_dict()
        except KeyError:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(GPT_PRESETS)}") from None
        if changes.get("cond", data["cond"]) != data["cond"]:
            for key in ("num_classes", "text_encoder", "text_dim", "num_prefix_tokens"):
                data[key] = None
        return cls(**{**data, **changes})

    @classmethod
    def for_tokenizer(cls, tok_config: Any, *, preset: str = "tiny", **changes: Any) -> GPTConfig:
        """A preset sized for a tokenizer: vocabulary = its codebook, max tokens = its K registers."""
        return cls.from_preset(
            preset,
            codebook_size=tok_config.codebook_size,
            max_tokens=tok_config.num_registers,
            **changes,
        )


def _paper(depth: int) -> GPTConfig:
    # "dN": depth N at width 64*N with 64-wide heads, as for the tokenizer; vocabulary 64,000 and
    # K = 256 (ImageNet: 1,000 classes). Class-conditional sizes: d12 0.18 B, d16 0.33 B, d20 0.56 B,
    # d24 0.88 B, d30 1.57 B, d36 2.59 B parameters (LlamaGen's B to XXL and beyond).
    return GPTConfig(depth=depth, dim=64 * depth, num_heads=depth, num_classes=1000)


GPT_PRESETS: dict[str, GPTConfig] = {
    # CPU demo for the tiny tokenizer (1,000 codes, K = 32): about 3.5 M parameters.
    "tiny": GPTConfig(codebook_size=1000, max_tokens=32, depth=4, dim=256, num_heads=4, num_classes=10),
    "d12": _paper(12),
    "d16": _paper(16),
    "d20": _paper(20),
    "d24": _paper(24),
    "d30": _paper(30),
    "d36": _paper(36),
}


# Building blocks ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in fp32 whatever the activation dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rope_angles(
    positions: torch.Tensor, head_dim: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (*positions.shape, head_dim / 2) for positions (S,) or
    (B, S); cheap enough to compute per call."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., S, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, S, head_dim) by position; the two halves of the head dim form the pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of every layer for step-by-step decoding, preallocated to `capacity`."""

    keys: list[torch.Tensor]  # per layer (B, H, capacity, head_dim)
    values: list[torch.Tensor]
    key_mask: torch.Tensor | None  # (B, capacity) bool, False at padded prefix slots; None: no padding
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices or a bool mask over the batch): finished sequences leave the batch."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Attend over x (B, T, D); with `cache`, write k, v at [start, start+T) and attend over [0, start+T)."""
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache_k, cache_v = cache
            cache_k[:, :, start : start + T] = k
            cache_v[:, :, start : start + T] = v
            k, v = cache_k[:, :, : start + T], cache_v[:, :, : start + T]
        # Without a mask, causal over a square block (full sequence or prefill) or none (one query).
        is_causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, 2 * config.mlp_hidden_dim, bias=False)  # gate and value fused
        self.out = nn.Linear(config.mlp_hidden_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc(x).chunk(2, dim=-1)
        return self.out(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, start)
        return x + self.mlp(self.mlp_norm(x))


# The network -------------------------------------------------------------------------------------
class GPT(nn.Module):
    """Decoder-only transformer from (prefix embeddings, token ids) to next-token logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Init scheme: embeddings and linears N(0, 0.02); the two residual-branch output projections
        of every block N(0, 0.02 / sqrt(2 * depth)) (GPT-2), so the residual stream's variance does
        not grow with depth; RMSNorm gains 1. No biases anywhere. A no-op on the `meta` device."""
        if self.tok_emb.weight.is_meta:  # nothing to fill; skipping also avoids nn.init's slow meta path
            return
        residual_std = 0.02 / math.sqrt(2 * self.config.depth)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("attn.out", "mlp.out")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # Shared pieces -------------------------------------------------------------------------------
    def _rope(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + length, device=device)
        return rope_angles(positions, self.config.head_dim, self.config.rope_base)

    def _check(self, prefix: torch.Tensor, num_inputs: int) -> None:
        L = prefix.shape[1]
        if prefix.ndim != 3 or prefix.shape[2] != self.config.dim or not 1 <= L <= self.config.num_prefix_tokens:
            raise ValueError(
                f"prefix must be (B, 1..{self.config.num_prefix_tokens}, {self.config.dim}), got {tuple(prefix.shape)}"
            )
        if num_inputs > self.config.max_tokens - 1:
            raise ValueError(
                f"at most max_tokens - 1 = {self.config.max_tokens - 1} token inputs, got {num_inputs}"
            )

    @staticmethod
    def _prefix_attn_mask(prefix_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
        """(B, 1, S, S) bool: causal, and padded prefix keys visible to no query but themselves."""
        if prefix_mask is None:
            return None
        B, L = prefix_mask.shape
        S = L + num_tokens
        key_valid = torch.cat([prefix_mask.bool(), prefix_mask.new_ones(B, num_tokens, dtype=torch.bool)], 1)
        eye = torch.eye(S, dtype=torch.bool, device=prefix_mask.device)
        causal = torch.ones(S, S, dtype=torch.bool, device=prefix_mask.device).tril()
        return (causal & (key_valid[:, None, :] | eye))[:, None]  # (B, 1, S, S)

    def features(
        self, prefix: torch.Tensor, tokens: torch.Tensor, prefix_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-normed states (B, T + 1, D) at the positions that predict tokens 0..T."""
        self._check(prefix, tokens.shape[1])
        L = prefix.shape[1]
        x = torch.cat([prefix, self.tok_emb(tokens).to(prefix.dtype)], dim=1)  # (B, S, D)
        cos, sin = self._rope(0, x.shape[1], x.device)
        attn_mask = self._prefix_attn_mask(prefix_mask, tokens.shape[1])
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)
        return self.norm(x[:, L - 1 :])

    def features_packed(self, x: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Final-normed states (R, S, D) of packed rows: input embeddings x (R, S, D), each position's
        index within its own sequence (R, S) (rotary positions restart per sequence) and the
        block-diagonal mask (R, 1, S, S) of `flextok.packing.packed_attention_mask`."""
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_base)  # (R, S, hd/2)
        cos, sin = cos[:, None], sin[:, None]  # (R, 1, S, hd/2): broadcast over heads
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)
        return self.norm(x)

    def forward(
        self, prefix: torch.Tensor, tokens: torch.Tensor, prefix_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T + 1, V): entry j is the distribution of token j.

        Args:
            prefix: (B, L, D) condition embeddings.
            tokens: (B, T) input ids, T <= K - 1 (the last token of a sequence is never an input).
            prefix_mask: (B, L) bool, False at padded prefix slots; None when nothing is padded.
        """
        return self.head(self.features(prefix, tokens, prefix_mask))

    def next_token_logits(
        self, prefix: torch.Tensor, tokens: torch.Tensor, prefix_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, V) of the token after `tokens`, recomputing the whole sequence (no cache)."""
        return self.head(self.features(prefix, tokens, prefix_mask)[:, -1])

    # Step-by-step decoding -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self, prefix: torch.Tensor, prefix_mask: torch.Tensor | None = None, *, num_tokens: int | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Run the prefix into a fresh cache sized for `num_tokens` (default K) outputs.

        Returns the logits (B, V) of token 0 and the cache for `decode_step`.
        """
        num_tokens = self.config.max_tokens if num_tokens is None else num_tokens
        if not 1 <= num_tokens <= self.config.max_tokens:
            raise ValueError(f"num_tokens must be in 1..{self.config.max_tokens}, got {num_tokens}")
        self._check(prefix, 0)
        B, L, _ = prefix.shape
        capacity = L + num_tokens - 1
        shape = (B, self.config.num_heads, capacity, self.config.head_dim)
        # The cache holds keys and values in the dtype they are computed in: under autocast that is
        # the autocast dtype (half the memory and bandwidth of fp32 at every decode step).
        device_type = prefix.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else prefix.dtype
        cache = KVCache(
            keys=[prefix.new_empty(shape, dtype=dtype) for _ in self.blocks],
            values=[prefix.new_empty(shape, dtype=dtype) for _ in self.blocks],
            key_mask=None,
        )
        if prefix_mask is not None:
            cache.key_mask = prefix_mask.new_ones(B, capacity, dtype=torch.bool)
            cache.key_mask[:, :L] = prefix_mask.bool()
        cos, sin = self._rope(0, L, prefix.device)
        attn_mask = self._prefix_attn_mask(prefix_mask, 0)
        x = prefix
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, (cache.keys[layer], cache.values[layer]), 0)
        cache.length = L
        return self.head(self.norm(x[:, -1])), cache

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row (B,) at the cache's next position; returns the next logits (B, V)."""
        start = cache.length
        if start >= cache.capacity:
            raise ValueError(f"KV cache is full ({cache.capacity} positions)")
        x = self.tok_emb(tokens.view(-1, 1)).to(cache.keys[0].dtype)  # (B, 1, D)
        cos, sin = self._rope(start, 1, x.device)
        attn_mask = None
        if cache.key_mask is not None:
            attn_mask = cache.key_mask[:, None, None, : start + 1]  # (B, 1, 1, start + 1)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, (cache.keys[layer], cache.values[layer]), start)
        cache.length = start + 1
        return self.head(self.norm(x[:, -1]))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
