"""Official FlexTok releases (EPFL-VILAB/flextok_*): recognise their state dicts, infer the preset
from tensor shapes, and map their keys onto this implementation.

Only key names and shapes are known here (see shared/flextok-official manifests); nothing of the
official code is used. The mapping is strict: every official key lands on exactly one of our state
dict entries and every entry of ours is covered, otherwise `CheckpointError` lists the keys.

Known guesses carried by the mapping (not checkable without the real weights):
- decoder adaLN: 12 chunks = [patches: shift, scale, gate (attn), shift, scale, gate (mlp) ;
  registers: the same], DiT order within each part;
- patch flattening order inside a patch (p1, p2, c);
- the decoder register position table [1, 1, D, K] is stored by us as (K, D) (a transpose).
"""

from __future__ import annotations

import re

import torch

from flextok.checkpoint import CheckpointError
from flextok.config import FlexTokConfig, FSQConfig, VAEConfig

ENC = "encoder.module_dict."
DEC = "decoder.module_dict."

# official prefix -> our prefix; the first matching rule wins.
_RENAMES: tuple[tuple[str, str], ...] = (
    (ENC + "enc_patch_emb.patch_proj.", "encoder.patch_emb."),
    (ENC + "enc_posemb_module.posembs", "encoder.pos_emb"),
    (ENC + "enc_register_module.registers", "encoder.registers"),
    (ENC + "enc_transformer.blocks.", "encoder.blocks."),
    (ENC + "enc_to_latents.proj.", "encoder.to_codes."),
    (DEC + "dec_from_latents.proj.", "decoder.from_codes."),
    (DEC + "dec_registers_posemb_module.posembs", "decoder.register_pos_emb"),
    (DEC + "dec_nested_dropout.dropout_mask_token", "decoder.mask_token"),
    (DEC + "dec_latent_dropout.nullcond", "decoder.null_cond"),
    (DEC + "dec_noise_patch_emb.patch_proj.", "decoder.patch_emb."),
    (DEC + "dec_patches_posemb_module.posembs", "decoder.pos_emb"),
    (DEC + "dec_time_embedder.mlp.", "decoder.time_embed.mlp."),
    (DEC + "dec_transformer.blocks.", "decoder.blocks."),
    (DEC + "dec_to_patches.adaLN_modulation.", "decoder.final.adaLN_modulation."),
    (DEC + "dec_to_patches.proj.", "decoder.final.proj."),
    ("vae.vae.", "vae.vae."),
)

# Diffusers renamed VAE attention keys; very old files use the legacy names.
_LEGACY_VAE_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}

# FSQ levels by number of code dims, for official releases (their configs are not in the file).
_OFFICIAL_FSQ = {6: (8, 8, 8, 5, 5, 5)}


def is_official_state_dict(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(ENC) for k in state) and any(k.startswith(DEC) for k in state)


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not indices or indices != set(range(max(indices) + 1)):
        raise CheckpointError(f"official checkpoint: blocks under {prefix} are missing or not contiguous")
    return max(indices) + 1


def infer_config(state: dict[str, torch.Tensor]) -> FlexTokConfig:
    """Rebuild the architecture from tensor shapes (widths, depths, K, FSQ dims, grid, VAE)."""
    try:
        num_registers, enc_dim = state[ENC + "enc_register_module.registers"].shape
        dec_dim = state[DEC + "dec_from_latents.proj.weight"].shape[0]
        num_dims = state[ENC + "enc_to_latents.proj.weight"].shape[0]
        grid = state[ENC + "enc_posemb_module.posembs"].shape[-1]
        patch_in = state[ENC + "enc_patch_emb.patch_proj.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"official checkpoint lacks {e.args[0]}") from None
    if num_dims not in _OFFICIAL_FSQ:
        raise CheckpointError(f"official checkpoint with {num_dims} FSQ dims: unknown levels")
    has_vae = any(k.startswith("vae.vae.") for k in state)
    if has_vae:
        latent_channels = state["vae.vae.encoder.conv_out.weight"].shape[0] // 2
        vae = VAEConfig(latent_channels=latent_channels)
        patch_size = int(round((patch_in / latent_channels) ** 0.5))
        image_size = grid * patch_size * vae.downsample
    else:
        vae, patch_size = None, int(round((patch_in / 3) ** 0.5))
        image_size = grid * patch_size
    return FlexTokConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_registers=int(num_registers),
        encoder_depth=_depth(state, ENC + "enc_transformer.blocks."),
        encoder_dim=int(enc_dim),
        decoder_depth=_depth(state, DEC + "dec_transformer.blocks."),
        decoder_dim=int(dec_dim),
        head_dim=64,
        fsq=FSQConfig(levels=_OFFICIAL_FSQ[num_dims]),
        vae=vae,
    )


def map_key(key: str) -> str | None:
    for old, new in _RENAMES:
        if key.startswith(old):
            mapped = new + key[len(old):]
            if mapped.startswith("vae.vae."):
                for legacy, modern in _LEGACY_VAE_ATTN.items():
                    mapped = mapped.replace(legacy, modern)
            return mapped
    return None


def map_state_dict(state: dict[str, torch.Tensor], config: FlexTokConfig) -> dict[str, torch.Tensor]:
    """Official keys -> ours. Unmapped or colliding keys raise `CheckpointError` naming them."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        new = map_key(key)
        if new is None:
            unmapped.append(key)
            continue
        if new in out:
            raise CheckpointError(f"official keys collide on {new}")
        if new == "decoder.register_pos_emb":
            value = value.reshape(config.decoder_dim, config.num_registers).t().contiguous()  # (K, D)
        out[new] = value
    if unmapped:
        raise CheckpointError(f"official checkpoint keys with no counterpart here: {sorted(unmapped)[:8]} ({len(unmapped)})")
    return out


def expected_official_shape(key: str, config: FlexTokConfig, ours: torch.Size) -> tuple[int, ...]:
    """The official shape of the tensor that maps onto our `key` of shape `ours` (for tests)."""
    if key == "decoder.register_pos_emb":
        return (1, 1, config.decoder_dim, config.num_registers)
    return tuple(ours)
