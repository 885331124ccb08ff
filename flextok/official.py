"""Official FlexTok releases (EPFL-VILAB/flextok_*): recognise their state dicts, infer the
architecture from tensor shapes and the release's config.json, and map their keys onto this
implementation.

Nothing of the official code is used: key names and shapes come from shared/flextok-official's
manifests, numerics from a golden fixture of the official code's outputs (tests/fixtures/
official_golden, tests/flextok/test_official_golden.py). The mapping is strict: every official key
lands on exactly one of our state dict entries and every entry of ours is covered, otherwise
`CheckpointError` lists the keys.

Conventions the mapping relies on, each confirmed by the golden test (every stage of a random-weight
d2-d2 release matches the official outputs to float rounding: ids exact, velocities to 1e-5):
- decoder adaLN: 12 chunks = [patches' six ; registers' six], each six ordered gate_attn, gate_mlp,
  shift_attn, scale_attn, shift_mlp, scale_mlp (`flextok.layers.ADALN_CHUNKS`); the output head's two
  chunks are shift, scale;
- patch flattening order inside a patch (p1, p2, c);
- the decoder register position table [1, 1, D, K] is stored by us as (K, D) (a transpose);
- time features: max period 256, t * 1000 / max_timestep, cosine half first; LayerNorm eps 1e-5;
  FSQ half-width (L - 1)(1 + 1e-3)/2 without a clamp; APG on the velocities; VAE decode unclamped.
Still unconfirmed (the fixture cannot tell): the release's real values of settings that no tensor
shape reveals are read from its config.json when present (`read_release_config`); without one, the
values of the shared manifests are assumed (FSQ [8, 8, 8, 5, 5, 5], max_timestep 1, no muP read-out,
VAE GroupNorm with 32 groups).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import torch

from flextok.checkpoint import CheckpointError, resolve_weights_path
from flextok.config import FlexTokConfig, FSQConfig, TokenizerObjective, VAEConfig

RELEASE_CONFIG = "config.json"
_MAX_CONFIG_BYTES = 1 << 20

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

# FSQ levels by number of code dims, for a release without its config.json.
_OFFICIAL_FSQ = {6: (8, 8, 8, 5, 5, 5)}

# The module order of a release's encoder and decoder (config.json lists them in execution order);
# the parameter-free REPA unpacker (training only) may be present or not.
_ENCODER_MODULES = ("enc_channels_to_last", "enc_patch_emb", "enc_posemb_module", "enc_register_module",
                    "enc_seq_packer", "enc_transformer", "enc_unpacker", "enc_to_latents")
_DECODER_MODULES = ("dec_from_latents", "dec_registers_posemb_module", "dec_nested_dropout", "dec_latent_dropout",
                    "dec_noise_channels_to_last", "dec_noise_patch_emb", "dec_patches_posemb_module",
                    "dec_seq_packer", "dec_time_embedder", "dec_transformer", "dec_unpacker", "dec_repa_unpacker",
                    "dec_to_patches", "dec_channels_to_first")
_OPTIONAL_MODULES = {"dec_repa_unpacker"}


def is_official_state_dict(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(ENC) for k in state) and any(k.startswith(DEC) for k in state)


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not indices or indices != set(range(max(indices) + 1)):
        raise CheckpointError(f"official checkpoint: blocks under {prefix} are missing or not contiguous")
    return max(indices) + 1


def read_release_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The release's config.json beside its weights (the official `save_pretrained` layout), or None."""
    file = resolve_weights_path(path).parent / RELEASE_CONFIG
    if not file.is_file():
        return None
    if file.stat().st_size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{file}: {file.stat().st_size} bytes is too large for a FlexTok config")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not {"encoder", "decoder"} <= set(config):
        raise CheckpointError(f"{file}: not a FlexTok release config (no encoder/decoder entries)")
    return config


def _infer_vae(state: dict[str, torch.Tensor], norm_num_groups: int) -> VAEConfig:
    """A diffusers AutoencoderKL's channels, blocks and latent channels from its tensor shapes. The
    GroupNorm group count is not in any shape: the caller passes it (32 in every FlexTok VAE)."""
    prefix = "vae.vae.encoder.down_blocks."
    try:
        blocks = _depth(state, prefix)
        channels = tuple(int(state[f"{prefix}{i}.resnets.0.conv1.weight"].shape[0]) for i in range(blocks))
        layers = _depth(state, prefix + "0.resnets.")
        latent_channels = int(state["vae.vae.encoder.conv_out.weight"].shape[0]) // 2
    except KeyError as e:
        raise CheckpointError(f"official checkpoint: VAE lacks {e.args[0]}") from None
    if any(c % norm_num_groups for c in channels):
        raise CheckpointError(f"official VAE channels {channels} are not multiples of {norm_num_groups} groups")
    return VAEConfig(latent_channels=latent_channels, downsample=2 ** (blocks - 1), block_out_channels=channels,
                     layers_per_block=layers, norm_num_groups=norm_num_groups)


def infer_config(state: dict[str, torch.Tensor], release: dict[str, Any] | None = None) -> FlexTokConfig:
    """Rebuild the architecture from tensor shapes (widths, depths, K, FSQ dims, grid, VAE) and, when
    given, the release's config.json (FSQ levels, time embedding, VAE scaling; `check_release_config`
    refuses what this implementation does not compute the same way)."""
    try:
        num_registers, enc_dim = state[ENC + "enc_register_module.registers"].shape
        dec_dim = state[DEC + "dec_from_latents.proj.weight"].shape[0]
        num_dims = state[ENC + "enc_to_latents.proj.weight"].shape[0]
        grid = state[ENC + "enc_posemb_module.posembs"].shape[-1]
        patch_in = state[ENC + "enc_patch_emb.patch_proj.weight"].shape[1]
        time_freq_dim = state[DEC + "dec_time_embedder.mlp.0.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"official checkpoint lacks {e.args[0]}") from None
    settings = _release_settings(release) if release is not None else {}
    levels = settings.get("levels") or _OFFICIAL_FSQ.get(num_dims)
    if levels is None or len(levels) != num_dims:
        raise CheckpointError(f"official checkpoint with {num_dims} FSQ dims: unknown levels {levels}")
    has_vae = any(k.startswith("vae.vae.") for k in state)
    if has_vae:
        vae = _infer_vae(state, norm_num_groups=settings.get("norm_num_groups", 32))
        if "scaling_factor" in settings:
            vae = dataclasses.replace(vae, scaling_factor=settings["scaling_factor"])
        patch_size = int(round((patch_in / vae.latent_channels) ** 0.5))
        image_size = grid * patch_size * vae.downsample
    else:
        if release is not None and "vae" in release:
            raise CheckpointError("the release config names a VAE whose weights are not in the checkpoint")
        vae, patch_size = None, int(round((patch_in / 3) ** 0.5))
        image_size = grid * patch_size
    config = FlexTokConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_registers=int(num_registers),
        encoder_depth=_depth(state, ENC + "enc_transformer.blocks."),
        encoder_dim=int(enc_dim),
        decoder_depth=_depth(state, DEC + "dec_transformer.blocks."),
        decoder_dim=int(dec_dim),
        head_dim=64,
        time_freq_dim=int(time_freq_dim),
        max_timestep=float(settings.get("max_timestep", 1.0)),
        fsq=FSQConfig(levels=tuple(levels)),
        vae=vae,
    )
    if release is not None:
        _check_shapes_agree(release, config)
    return config


def _module(release: dict[str, Any], part: str, name: str) -> dict[str, Any]:
    modules = release.get(part, {}).get("module_dict", {})
    entry = modules.get(name)
    if not isinstance(entry, dict):
        raise CheckpointError(f"release config: {part}.module_dict has no {name}")
    return entry


def _require(entry: dict[str, Any], name: str, key: str, allowed: tuple, default: Any = None) -> Any:
    value = entry.get(key, default)
    if value not in allowed:
        raise CheckpointError(
            f"release config: {name}.{key} = {value!r} is not supported here (supported: {list(allowed)})"
        )
    return value


def release_objective(release: dict[str, Any] | None) -> TokenizerObjective | None:
    """What a release's config.json says of how it was trained (the null-condition probability,
    uniform nested dropout), as the objective a fine-tune starts from; None without a config.json."""
    if release is None:
        return None
    _release_settings(release)  # refuses what is not computed the same way here

    changes: dict[str, Any] = {}
    null_cond = _module(release, "decoder", "dec_latent_dropout")
    prob = null_cond.get("dropout_prob")
    if isinstance(prob, (int, float)) and not isinstance(prob, bool) and 0 <= prob < 1:
        changes["cond_dropout_prob"] = float(prob)
    if _module(release, "decoder", "dec_nested_dropout").get("size_sampling_mode") == "uniform":
        changes["nested_dropout_mode"] = "uniform"  # other modes keep ours
    return TokenizerObjective(**changes)


def _release_settings(release: dict[str, Any]) -> dict[str, Any]:
    """What a release's config.json says that tensor shapes do not, as FlexTokConfig values; anything
    that would compute differently here is a `CheckpointError` naming the setting."""
    for part, expected in (("encoder", _ENCODER_MODULES), ("decoder", _DECODER_MODULES)):
        names = list(release[part].get("module_dict", {}))
        unknown = [n for n in names if n not in expected]
        if unknown:
            raise CheckpointError(f"release config: {part} modules not supported here: {unknown}")
        required = [n for n in expected if n not in _OPTIONAL_MODULES or n in names]
        if names != required:
            raise CheckpointError(f"release config: {part} modules {names} are not in the supported order {required}")
    out: dict[str, Any] = {}
    _require(_module(release, "encoder", "enc_seq_packer"), "enc_seq_packer", "mask_mode", ("causal_last",))
    _require(_module(release, "encoder", "enc_posemb_module"), "enc_posemb_module", "posemb_type", ("sincos",))
    _require(_module(release, "encoder", "enc_register_module"), "enc_register_module", "ordering_mode", ("nested",))
    _require(_module(release, "decoder", "dec_seq_packer"), "dec_seq_packer", "mask_mode", ("full",))
    _require(_module(release, "decoder", "dec_seq_packer"), "dec_seq_packer", "per_subseq_embs", (True,))
    _require(_module(release, "decoder", "dec_patches_posemb_module"), "dec_patches_posemb_module", "posemb_type",
             ("sincos",))
    _require(_module(release, "decoder", "dec_registers_posemb_module"), "dec_registers_posemb_module",
             "posemb_type", ("learnable_sum",))
    _require(_module(release, "decoder", "dec_transformer"), "dec_transformer", "adaLN_expansion", (2,))
    for part, name in (("encoder", "enc_to_latents"), ("decoder", "dec_to_patches")):
        # muP read-out rescales the head's output by a width ratio not verified here: refuse, never guess.
        _require(_module(release, part, name), name, "use_mup_readout", (False,), default=False)
    _require(_module(release, "decoder", "dec_to_patches"), "dec_to_patches", "adaLN_bias", (True,), default=True)
    time = _module(release, "decoder", "dec_time_embedder")
    if "max_timestep" in time:
        out["max_timestep"] = float(time["max_timestep"])
    regularizer = release.get("regularizer", {})
    if regularizer:
        if not str(regularizer.get("_target_", "")).endswith("FSQ"):
            raise CheckpointError(f"release config: regularizer {regularizer.get('_target_')!r} is not FSQ")
        out["levels"] = tuple(int(x) for x in regularizer.get("levels", ()))
    vae = release.get("vae")
    if vae:
        # sample_posterior is deliberately not honoured: tokens use the posterior mean (deterministic).
        if "scaling_factor" in vae:
            out["scaling_factor"] = float(vae["scaling_factor"])
        if "norm_num_groups" in vae:
            out["norm_num_groups"] = int(vae["norm_num_groups"])
    return out


def _check_shapes_agree(release: dict[str, Any], config: FlexTokConfig) -> None:
    """The widths, depths, K, patch size and channels the config.json states equal the shapes'."""
    checks = [
        ("encoder", "enc_transformer", "dim", config.encoder_dim),
        ("encoder", "enc_transformer", "depth", config.encoder_depth),
        ("encoder", "enc_register_module", "n_max", config.num_registers),
        ("encoder", "enc_to_latents", "dim_out", config.fsq.num_dims),
        ("decoder", "dec_transformer", "dim", config.decoder_dim),
        ("decoder", "dec_transformer", "depth", config.decoder_depth),
        ("decoder", "dec_time_embedder", "frequency_embedding_size", config.time_freq_dim),
        ("decoder", "dec_noise_patch_emb", "channels_in", config.latent_channels),
    ]
    for part, name, key, value in checks:
        stated = _module(release, part, name).get(key)
        if stated is not None and stated != value:
            raise CheckpointError(f"release config: {name}.{key} = {stated} but the weights have {value}")
    for part, name in (("encoder", "enc_patch_emb"), ("decoder", "dec_noise_patch_emb")):
        sizes = _module(release, part, name).get("patch_sizes")
        if sizes is not None and list(sizes) != [config.patch_size] * 2:
            raise CheckpointError(f"release config: {name}.patch_sizes = {sizes} is not supported here "
                                  f"(square {config.patch_size} x {config.patch_size} from the weights)")


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
