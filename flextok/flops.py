"""Analytic forward FLOPs of the FlexTok networks (multiply-adds count as 2 FLOPs).

Used by benchmarks (achieved GFLOP/s) and by cluster-scale projections. Counts the matmuls of the
transformer trunks, patch embeddings and heads; norms, activations and the VAE are left out (the VAE
is reported separately by callers that use one).
"""

from __future__ import annotations

from flextok.config import FlexTokConfig, mlp_hidden_dim


def _trunk_flops(num_tokens: int, dim: int, depth: int, adaln_out: int = 0) -> int:
    T, D, H = num_tokens, dim, mlp_hidden_dim(dim)
    projections = 2 * T * 4 * D * D  # q, k, v, out
    attention = 2 * 2 * T * T * D  # scores and weighted sum
    mlp = 2 * T * 3 * D * H
    adaln = 2 * D * adaln_out  # one modulation vector per sample
    return depth * (projections + attention + mlp + adaln)


def encoder_flops(config: FlexTokConfig) -> int:
    """FLOPs of one image through the encoder (patch embedding, trunk, FSQ head)."""
    c = config
    T = c.num_patches + c.num_registers
    embed = 2 * c.num_patches * c.patch_dim * c.encoder_dim
    head = 2 * c.num_registers * c.encoder_dim * c.fsq.num_dims
    return embed + _trunk_flops(T, c.encoder_dim, c.encoder_depth) + head


def decoder_flops(config: FlexTokConfig) -> int:
    """FLOPs of one decoder forward (one flow step for one image, without guidance)."""
    c = config
    D = c.decoder_dim
    T = c.num_patches + c.num_registers
    embed = 2 * c.num_patches * c.patch_dim * D + 2 * c.num_registers * c.fsq.num_dims * D
    time = 2 * (c.time_freq_dim * D + D * D)
    head = 2 * c.num_patches * D * c.patch_dim + 2 * D * 2 * D
    return embed + time + _trunk_flops(T, D, c.decoder_depth, adaln_out=12 * D) + head


def detokenize_flops(config: FlexTokConfig, steps: int, guided: bool) -> int:
    """One image decoded with `steps` Euler steps; guidance doubles the rows of every forward."""
    return decoder_flops(config) * steps * (2 if guided else 1)
