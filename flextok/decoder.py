"""The FlexTok decoder network: predicts the rectified-flow velocity of noised latents given registers.

Owns: register embedding (FSQ codes -> width D, learned register positions, the nested-dropout mask
token, the learned null condition for classifier-free guidance), the noised-patch embedding, the
timestep embedder, adaLN-zero blocks over `[noised patches ; registers]` with full attention, and the
output head. Does not own the noise process or the sampler (`flextok.flow`).
"""

from __future__ import annotations

import torch
from torch import nn

from flextok.config import FlexTokConfig
from flextok.layers import (
    ADALN_CHUNKS,
    AdaLNBlock,
    TimestepEmbedder,
    layer_norm_fp32,
    modulate,
    patchify,
    sincos_2d,
    unpatchify,
)
from flextok.nested_dropout import keep_mask

# DiT's chunk order, which checkpoints written before the conventions were recorded use.
_DIT_CHUNKS = ("shift_attn", "scale_attn", "gate_attn", "shift_mlp", "scale_mlp", "gate_mlp")


def legacy_adaln_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows of every decoder block's adaLN linear reordered from DiT's chunk order to `ADALN_CHUNKS`
    (per part): an exact permutation, so a pre-convention checkpoint computes the same function."""
    order = [_DIT_CHUNKS.index(name) for name in ADALN_CHUNKS]
    out = dict(state)
    for key, value in state.items():
        if key.startswith("decoder.blocks.") and ".adaLN_modulation.1." in key:
            parts = value.reshape(2, 6, value.shape[0] // 12, *value.shape[1:])  # (part, chunk, D, ...)
            out[key] = parts[:, order].reshape(value.shape).contiguous()
    return out


class FinalLayer(nn.Module):
    """adaLN (shift, scale) from the time embedding, then a linear map to patch values."""

    def __init__(self, dim: int, patch_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.norm_eps = norm_eps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.proj(modulate(layer_norm_fp32(x, self.norm_eps), shift, scale))


class Decoder(nn.Module):
    def __init__(self, config: FlexTokConfig) -> None:
        super().__init__()
        self.config = config
        D, K = config.decoder_dim, config.num_registers
        self.from_codes = nn.Linear(config.fsq.num_dims, D)
        self.register_pos_emb = nn.Parameter(torch.zeros(K, D))
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.null_cond = nn.Parameter(torch.zeros(D))
        self.patch_emb = nn.Linear(config.patch_dim, D)
        self.register_buffer("pos_emb", sincos_2d(D, config.grid_size))  # (1, D, g, g)
        self.time_embed = TimestepEmbedder(
            D, config.time_freq_dim, max_period=config.time_max_period, max_timestep=config.max_timestep
        )
        eps = config.norm_eps
        self.blocks = nn.ModuleList(AdaLNBlock(D, config.head_dim, eps) for _ in range(config.decoder_depth))
        self.final = FinalLayer(D, config.patch_dim, eps)

    def init_weights(self) -> None:
        """Linear layers xavier-uniform with zero bias; time-MLP normal(0.02); register positions,
        mask token and null condition truncated normal (0.02); adaLN modulations and the output
        head zero (adaLN-zero: every block starts as the identity, the velocity starts at 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.register_pos_emb, self.mask_token, self.null_cond):
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for layer in (self.final.adaLN_modulation[1], self.final.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed_registers(
        self, codes: torch.Tensor, keep_k: torch.Tensor, drop_cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, K, d) codes, (B,) keep counts, (B,) bool null-condition flags -> (B, K, D) registers.

        Order: project codes, add register positions, replace positions >= k by the mask token,
        replace the whole sequence by the null condition where `drop_cond`.
        """
        regs = self.from_codes(codes.to(self.from_codes.weight.dtype)) + self.register_pos_emb  # (B, K, D)
        kept = keep_mask(keep_k, self.config.num_registers).unsqueeze(-1)  # (B, K, 1)
        regs = torch.where(kept, regs, self.mask_token.to(regs.dtype))
        if drop_cond is not None:
            regs = torch.where(drop_cond.view(-1, 1, 1), self.null_cond.to(regs.dtype), regs)
        return regs

    def forward(self, noised: torch.Tensor, t: torch.Tensor, registers: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) noised latents, (B,) flow times, (B, K, D) registers -> (B, C, H, W) velocity."""
        N = self.config.num_patches
        pos = self.pos_emb.flatten(2).transpose(1, 2)  # (1, N, D)
        x = self.patch_emb(patchify(noised, self.config.patch_size)) + pos  # (B, N, D)
        h = torch.cat([x, registers.to(x.dtype)], dim=1)  # (B, N + K, D)
        cond = self.time_embed(t)  # (B, D)
        for block in self.blocks:
            h = block(h, cond, N)
        out = self.final(h[:, :N], cond)  # (B, N, P*P*C)
        return unpatchify(out, self.config.patch_size, self.config.latent_channels)
