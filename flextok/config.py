"""Architecture configs for the FlexTok tokenizer, its training objective, and the preset registries.

Owns: frozen, keyword-only dataclasses describing *architecture* only (no batch size, paths or
learning rates: those live in job configs), their validation, JSON round trip, and the presets; and
`TokenizerObjective`, how the tokenizer is trained (nested dropout, flow times, CFG drop), which is a
training setting and not part of the architecture. Checkpoints written before the split recorded the
objective inside the architecture config: `split_recorded` reads both back from such a dict.
Does not own: building modules (see `flextok.tokenizer`) or checkpoint I/O (`flextok.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

NESTED_DROPOUT_MODES = ("uniform", "pow2")
TIME_SAMPLING_MODES = ("logit_normal", "uniform")
# Sizes no real model reaches (the paper's largest: depth 28, width 1792, 256 registers, 256 px): a
# config outside them comes from a broken or hostile checkpoint, refused before any module is built.
DEPTH_LIMIT, WIDTH_LIMIT, TOKENS_LIMIT, IMAGE_LIMIT = 512, 32_768, 8_192, 16_384


def check_int_fields(obj: Any, bounds: dict[str, tuple[int, int]], optional: tuple[str, ...] = ()) -> None:
    """Each named field of a config is a true int in [lo, hi] (configs arrive as JSON from files);
    those in `optional` may also be None."""
    for name, (lo, hi) in bounds.items():
        value = getattr(obj, name)
        if value is None and name in optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{type(obj).__name__}.{name} must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{type(obj).__name__}.{name}={value} is outside {lo}..{hi}")


def check_float_fields(obj: Any, names: tuple[str, ...]) -> None:
    """Each named field is a finite real number (not a string, bool or NaN)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{type(obj).__name__}.{name} must be a finite number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class FSQConfig:
    """Finite scalar quantisation: one integer level count per code dimension."""

    levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
    # Each dim is bounded to the half-width (L - 1)(1 + bound_eps)/2 before rounding: 1e-3 in the
    # official release. Checkpoints from before that was matched used -1e-3 (see LEGACY_CONVENTIONS).
    bound_eps: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.levels, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 2 <= x <= 1024 for x in self.levels
        ) or len(self.levels) > 16:
            raise ValueError(f"FSQConfig.levels must be at most 16 integers in 2..1024, got {self.levels!r}")
        object.__setattr__(self, "levels", tuple(int(x) for x in self.levels))
        check_float_fields(self, ("bound_eps",))
        if not -0.1 < self.bound_eps < 0.1:
            raise ValueError(f"FSQConfig.bound_eps must be small (|eps| < 0.1), got {self.bound_eps}")
        if not self.levels:
            raise ValueError("FSQConfig.levels must not be empty")
        if any(x < 2 for x in self.levels):
            raise ValueError(f"FSQConfig.levels must all be >= 2, got {self.levels}")
        if self.codebook_size > 2**16:
            raise ValueError(
                f"FSQ codebook of {self.codebook_size} codes does not fit uint16 token storage"
            )

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def num_dims(self) -> int:
        return len(self.levels)


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """A frozen diffusers `AutoencoderKL` (the paper's f8, 16-channel VAE by default).

    `path` is a local folder or file with diffusers weights; None builds the architecture with random
    weights (tests, `meta` device, or weights that arrive inside an official FlexTok checkpoint).
    """

    latent_channels: int = 16
    downsample: int = 8
    scaling_factor: float = 0.88
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    path: str | None = None

    def __post_init__(self) -> None:
        check_int_fields(self, {"latent_channels": (1, 1024), "downsample": (1, 256), "layers_per_block": (1, 64),
                                "norm_num_groups": (1, 1024)})
        check_float_fields(self, ("scaling_factor",))
        if not isinstance(self.block_out_channels, (list, tuple)) or not 1 <= len(self.block_out_channels) <= 8 or not all(
            isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= WIDTH_LIMIT for c in self.block_out_channels
        ):
            raise ValueError(f"VAEConfig.block_out_channels must be 1..8 widths in 1..{WIDTH_LIMIT}, "
                             f"got {self.block_out_channels!r}")
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if self.downsample != 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(
                f"VAE downsample {self.downsample} does not match {len(self.block_out_channels)} blocks"
            )
        if self.latent_channels < 1 or self.scaling_factor <= 0:
            raise ValueError("VAE latent_channels must be >= 1 and scaling_factor > 0")


@dataclass(frozen=True, kw_only=True)
class FlexTokConfig:
    """Architecture of a FlexTok tokenizer (encoder, FSQ, rectified-flow decoder).

    Size "dN" in the paper is depth N at width 64·N with 64-wide heads.
    """

    image_size: int = 256
    image_channels: int = 3
    patch_size: int = 2
    num_registers: int = 256
    encoder_depth: int = 12
    encoder_dim: int = 768
    decoder_depth: int = 12
    decoder_dim: int = 768
    head_dim: int = 64
    time_freq_dim: int = 256
    # Numerical conventions, official values by default (verified against the release, issue 16):
    # LayerNorm epsilon of every non-affine LayerNorm (block pre-norms, QK-norms, the heads' norms);
    norm_eps: float = 1e-5
    # sinusoidal time features cos(t * 1000 / max_timestep * max_period^(-i/half)), sin(...).
    time_max_period: float = 256.0
    max_timestep: float = 1.0
    fsq: FSQConfig = field(default_factory=FSQConfig)
    vae: VAEConfig | None = None

    def __post_init__(self) -> None:
        fsq, vae = self.fsq, self.vae
        if isinstance(fsq, dict):
            object.__setattr__(self, "fsq", FSQConfig(**fsq))
        if isinstance(vae, dict):
            object.__setattr__(self, "vae", VAEConfig(**vae))
        if not isinstance(self.fsq, FSQConfig) or not (self.vae is None or isinstance(self.vae, VAEConfig)):
            raise ValueError("FlexTokConfig.fsq and .vae must be objects (or vae null)")
        check_int_fields(self, {
            "image_size": (1, IMAGE_LIMIT), "image_channels": (1, 64), "patch_size": (1, 64),
            "num_registers": (1, TOKENS_LIMIT), "encoder_depth": (1, DEPTH_LIMIT), "decoder_depth": (1, DEPTH_LIMIT),
            "encoder_dim": (1, WIDTH_LIMIT), "decoder_dim": (1, WIDTH_LIMIT), "head_dim": (1, 1024),
            "time_freq_dim": (2, 8192),
        })
        check_float_fields(self, ("norm_eps", "time_max_period", "max_timestep"))
        for name in ("image_size", "patch_size", "num_registers", "encoder_depth", "decoder_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"FlexTokConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_dim", "decoder_dim"):
            dim = getattr(self, name)
            if dim % self.head_dim:
                raise ValueError(f"FlexTokConfig.{name}={dim} is not a multiple of head_dim={self.head_dim}")
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"latent size {self.latent_size} is not divisible by patch_size {self.patch_size}"
            )
        if not 0.0 < self.norm_eps < 0.1:
            raise ValueError(f"norm_eps must be in (0, 0.1), got {self.norm_eps}")
        if self.time_max_period <= 1.0 or self.max_timestep <= 0.0:
            raise ValueError("time_max_period must be > 1 and max_timestep > 0")
        if self.vae is not None and self.image_size % self.vae.downsample:
            raise ValueError(f"image_size {self.image_size} not divisible by VAE downsample")

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of what the encoder sees: VAE latents, or pixels when there is no VAE."""
        return self.vae.latent_channels if self.vae is not None else self.image_channels

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample if self.vae is not None else self.image_size

    @property
    def grid_size(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    # Serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_recorded(cls, data: dict[str, Any]) -> tuple[FlexTokConfig, bool]:
        """A config as a checkpoint recorded it -> (config, predates_conventions). A checkpoint written
        before the numerical conventions were recorded (no `norm_eps`) was trained with
        `LEGACY_CONVENTIONS`: it gets those values, not today's defaults, and the caller must bring
        its weights to the current adaLN chunk order (`flextok.decoder.legacy_adaln_to_official`).
        Objective fields recorded inside it by older checkpoints are validated and left out
        (`split_recorded` gives them)."""
        data, _ = split_recorded(data)
        if "norm_eps" in data:
            return cls.from_dict(data), False
        return cls.from_dict(with_legacy_conventions(data)), True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlexTokConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FlexTokConfig fields: {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> FlexTokConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class TokenizerObjective:
    """How a tokenizer is trained: a training setting, not architecture (a model trained under any
    objective loads, tokenizes and decodes the same way).

    Nested dropout keeps the first k of K registers with k drawn by `nested_dropout_mode` (uniform
    over 1..K or over powers of two), except for a `full_k_fraction` of examples that keep all K.
    `cond_dropout_prob` of examples see the null condition (what decoder guidance needs). Flow
    times are drawn by `time_sampling`, with a `uniform_time_fraction` drawn uniformly instead
    (logit-normal rarely samples t near 1, where the Euler sampler starts) and a
    `noise_time_fraction` at exactly t = 1: there one decoder step is the mean reconstruction given
    the tokens, so these examples train a plain regression autoencoder on top of the flow objective.
    """

    nested_dropout_mode: str = "uniform"
    full_k_fraction: float = 0.0
    cond_dropout_prob: float = 0.1
    time_sampling: str = "logit_normal"
    uniform_time_fraction: float = 0.0
    noise_time_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_float_fields(self, ("full_k_fraction", "cond_dropout_prob", "uniform_time_fraction",
                                  "noise_time_fraction"))
        if self.nested_dropout_mode not in NESTED_DROPOUT_MODES:
            raise ValueError(f"nested_dropout_mode must be one of {NESTED_DROPOUT_MODES}")
        if self.time_sampling not in TIME_SAMPLING_MODES:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLING_MODES}")
        if not 0.0 <= self.cond_dropout_prob < 1.0:
            raise ValueError("cond_dropout_prob must be in [0, 1)")
        for name in ("full_k_fraction", "uniform_time_fraction", "noise_time_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerObjective:
        unknown = set(data) - set(OBJECTIVE_FIELDS)
        if unknown:
            raise ValueError(f"unknown TokenizerObjective fields: {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TokenizerObjective:
        return dataclasses.replace(self, **changes)


OBJECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(TokenizerObjective))


def split_recorded(data: dict[str, Any]) -> tuple[dict[str, Any], TokenizerObjective | None]:
    """A recorded tokenizer config dict -> (its architecture fields, the objective recorded inside it
    or None). Checkpoints and run folders written before the objective left the architecture config
    hold both in one dict; a field missing there had its then default, which is today's."""
    inside = {k: v for k, v in data.items() if k in OBJECTIVE_FIELDS}
    arch = {k: v for k, v in data.items() if k not in OBJECTIVE_FIELDS}
    return arch, (TokenizerObjective.from_dict(inside) if inside else None)


# The numerical conventions of checkpoints written before they were recorded in the config (the
# shipped models among them): LayerNorm eps 1e-6, time features with maximum period 10^4, FSQ
# half-width (L - 1)(1 - 1e-3)/2, and DiT's adaLN chunk order (an exact weight permutation of today's).
LEGACY_CONVENTIONS: dict[str, Any] = {
    "norm_eps": 1e-6,
    "time_max_period": 10000.0,
    "max_timestep": 1.0,
    "fsq": {"bound_eps": -1e-3},
}


def with_legacy_conventions(data: dict[str, Any]) -> dict[str, Any]:
    """A recorded config dict that predates the conventions, with `LEGACY_CONVENTIONS` filled in."""
    fsq = data.get("fsq", {})
    fsq = {**LEGACY_CONVENTIONS["fsq"], **fsq} if isinstance(fsq, dict) else fsq
    return {**data, **LEGACY_CONVENTIONS, "fsq": fsq}


def mlp_hidden_dim(dim: int) -> int:
    """SwiGLU hidden width: 2/3 of a 4x MLP, so the three matrices cost what two 4x matrices would."""
    return int(2 * 4 * dim / 3)


def _paper(enc_depth: int, dec_depth: int) -> FlexTokConfig:
    return FlexTokConfig(
        image_size=256,
        patch_size=2,
        num_registers=256,
        encoder_depth=enc_depth,
        encoder_dim=64 * enc_depth,
        decoder_depth=dec_depth,
        decoder_dim=64 * dec_depth,
        head_dim=64,
        fsq=FSQConfig(levels=(8, 8, 8, 5, 5, 5)),
        vae=VAEConfig(),
    )


TOKENIZER_PRESETS: dict[str, FlexTokConfig] = {
    # CPU demo: 32x32 pixels, no VAE, patch 4 (64 patches), 32 registers, 1,000 codes.
    "tiny": FlexTokConfig(
        image_size=32,
        patch_size=4,
        num_registers=32,
        encoder_depth=4,
        encoder_dim=192,
        decoder_depth=4,
        decoder_dim=192,
        head_dim=32,
        fsq=FSQConfig(levels=(8, 5, 5, 5)),
        vae=None,
    ),
    "d12_d12": _paper(12, 12),
    "d18_d18": _paper(18, 18),
    "d18_d28": _paper(18, 28),
}


# How each preset trains by default (flags override): the tiny CPU demo with powers-of-two nested
# dropout and a quarter of its flow times uniform; the paper's sizes with uniform k, logit-normal times
# and a 10% null condition (what the official release's config names).
TOKENIZER_OBJECTIVES: dict[str, TokenizerObjective] = {
    "tiny": TokenizerObjective(nested_dropout_mode="pow2", uniform_time_fraction=0.25),
    "d12_d12": TokenizerObjective(),
    "d18_d18": TokenizerObjective(),
    "d18_d28": TokenizerObjective(),
}


def get_objective(preset: str) -> TokenizerObjective:
    """The default training objective of a preset."""
    get_preset(preset)  # one clear error for an unknown name
    return TOKENIZER_OBJECTIVES[preset]


def get_preset(name: str) -> FlexTokConfig:
    try:
        return TOKENIZER_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown tokenizer preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}"
        ) from None
