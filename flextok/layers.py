"""Transformer building blocks shared by the FlexTok encoder and decoder.

Owns: the non-affine fp32 LayerNorm, attention with QK-norm over SDPA, the SwiGLU MLP, the plain
pre-norm block (encoder) and the adaLN-zero block with separate modulation for two sub-sequences
(decoder), 2D sin-cos positions and the sinusoidal time embedder.
Does not own: masks (built by the networks that use them) or any training process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from flextok.config import mlp_hidden_dim


def layer_norm_fp32(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters, computed in fp32 and cast back (stable under bf16).

    `eps` is the model's `norm_eps` (1e-5 in the official release), passed explicitly everywhere."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


@dataclass(frozen=True)
class CausalLast:
    """The encoder's attention pattern without a boolean mask: the first `num_first` positions
    (patches) attend to each other only; every later position i (a register) attends to all patches
    and to the registers up to itself.

    `Attention` computes it as two mask-free SDPA calls: patches over patches, and registers over the
    whole sequence with a lower-right-aligned causal bias. Both are eligible for the flash and
    memory-efficient kernels on CUDA (a boolean mask is not), and together they score N^2 + K(N + K)
    entries instead of (N + K)^2. The result equals the masked call (`causal_last_mask`) up to float
    summation order.
    """

    num_first: int


class Attention(nn.Module):
    """Multi-head self-attention: bias-free projections, QK-norm, SDPA with a boolean mask, none, or
    the split causal-last pattern (`CausalLast`)."""

    def __init__(self, dim: int, head_dim: int, norm_eps: float) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"dim {dim} is not a multiple of head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.norm_eps = norm_eps
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | CausalLast | None = None) -> torch.Tensor:
        B, T, D = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = layer_norm_fp32(self.wq(x).view(shape), self.norm_eps).transpose(1, 2)  # (B, H, T, hd)
        k = layer_norm_fp32(self.wk(x).view(shape), self.norm_eps).transpose(1, 2)  # (B, H, T, hd)
        v = self.wv(x).view(shape).transpose(1, 2)  # (B, H, T, hd)
        if isinstance(attn_mask, CausalLast):
            N = attn_mask.num_first
            y = torch.cat(
                [
                    F.scaled_dot_product_attention(q[:, :, :N], k[:, :, :N], v[:, :, :N]),  # (B, H, N, hd)
                    F.scaled_dot_product_attention(
                        q[:, :, N:], k, v, attn_mask=causal_lower_right(T - N, T)
                    ),  # (B, H, K, hd)
                ],
                dim=2,
            )
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """fc2(silu(fc1 x) * fc3 x), hidden width 8D/3, no biases."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = mlp_hidden_dim(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    """Pre-norm transformer block (encoder)."""

    def __init__(self, dim: int, head_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.norm_eps = norm_eps
        self.attn = Attention(dim, head_dim, norm_eps)
        self.mlp = SwiGLU(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | CausalLast | None = None) -> torch.Tensor:
        x = x + self.attn(layer_norm_fp32(x, self.norm_eps), attn_mask)
        return x + self.mlp(layer_norm_fp32(x, self.norm_eps))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# The six chunks of each part's adaLN modulation vector, in the order the official release splits it.
ADALN_CHUNKS = ("gate_attn", "gate_mlp", "shift_attn", "scale_attn", "shift_mlp", "scale_mlp")


class AdaLNBlock(nn.Module):
    """Pre-norm block with adaLN-zero time conditioning, modulated separately for two parts.

    The sequence is `[first ; second]` (the decoder's noised patches, then its registers); each part
    gets its own shift, scale and gate for attention and MLP: one linear layer gives 12 chunks, the
    first part's six then the second's, each six in the order of `ADALN_CHUNKS`.
    """

    def __init__(self, dim: int, head_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.norm_eps = norm_eps
        self.attn = Attention(dim, head_dim, norm_eps)
        self.mlp = SwiGLU(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 12 * dim))

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, num_first: int, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mods = self.adaLN_modulation(cond).chunk(12, dim=-1)  # 12 x (B, D)
        first, second = dict(zip(ADALN_CHUNKS, mods[:6])), dict(zip(ADALN_CHUNKS, mods[6:]))

        def mod(h: torch.Tensor, part: str) -> torch.Tensor:
            a, b = h[:, :num_first], h[:, num_first:]
            return torch.cat([modulate(a, first["shift_" + part], first["scale_" + part]),
                              modulate(b, second["shift_" + part], second["scale_" + part])], dim=1)

        def gate(h: torch.Tensor, part: str) -> torch.Tensor:
            a, b = h[:, :num_first], h[:, num_first:]
            return torch.cat([a * first["gate_" + part].unsqueeze(1), b * second["gate_" + part].unsqueeze(1)], dim=1)

        x = x + gate(self.attn(mod(layer_norm_fp32(x, self.norm_eps), "attn"), attn_mask), "attn")
        return x + gate(self.mlp(mod(layer_norm_fp32(x, self.norm_eps), "mlp")), "mlp")


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table, (1, D, H, W): half the channels encode rows, half columns."""
    if dim % 4:
        raise ValueError(f"sin-cos 2D positions need dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (D/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    angles = pos[:, None] * omega[None, :]  # (G, D/4)
    emb_1d = torch.cat([angles.sin(), angles.cos()], dim=1)  # (G, D/2)
    rows = emb_1d[:, None, :].expand(grid_size, grid_size, dim // 2)  # (H, W, D/2)
    cols = emb_1d[None, :, :].expand(grid_size, grid_size, dim // 2)  # (H, W, D/2)
    table = torch.cat([rows, cols], dim=-1)  # (H, W, D)
    return table.permute(2, 0, 1).unsqueeze(0).float().contiguous()  # (1, D, H, W)


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, max_timestep] -> sinusoidal features -> MLP -> (B, D).

    Features: cos(t * w_i) then sin(t * w_i) with frequencies w_i = 1000 / max_timestep *
    max_period^(-i/half), i = 0..half-1 (the release: max_period 256, cosine half first).
    """

    def __init__(self, dim: int, freq_dim: int = 256, *, max_period: float = 256.0, max_timestep: float = 1.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.max_timestep = max_timestep
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        ) * (1000.0 / self.max_timestep)
        # the scale goes on the frequencies, not on t: at t * 1000 ~ 700 rad one float32 ulp of the
        # product moves the velocity by ~1e-4, and this is the release's rounding (golden test)
        args = t.float()[:, None] * freqs[None]  # (B, F/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, F)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), patches in row-major order, values ordered (p1, p2, c)."""
    B, C, H, W = x.shape
    P = patch_size
    x = x.reshape(B, C, H // P, P, W // P, P)  # (B, C, h, P, w, P)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C)
    return x.reshape(B, (H // P) * (W // P), P * P * C)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, P*P*C) -> (B, C, H, W) for a square grid."""
    B, N, _ = x.shape
    g = math.isqrt(N)
    P = patch_size
    x = x.reshape(B, g, g, P, P, channels)  # (B, h, w, P, P, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, P, w, P)
    return x.reshape(B, channels, g * P, g * P)
