"""`FlexTok`: the tokenizer model and its public API.

Owns: wiring VAE (optional) -> encoder -> FSQ -> decoder, the training objective (nested dropout,
null-condition dropout, rectified-flow loss), `tokenize` / `detokenize`, and building from presets,
our checkpoints and official releases. The noise process and the sampler live in `flextok.flow`,
the official key mapping in `flextok.official`, file I/O in `flextok.checkpoint`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flextok import flow
from flextok.adaptive import AdaptiveTokens, LengthTarget, choose_lengths
from flextok.checkpoint import (
    CheckpointError,
    check_finite,
    config_from_metadata,
    file_sha256,
    load_checkpoint,
    read_metadata,
    read_shapes,
    resolve_weights_path,
    save_checkpoint,
)
from flextok.config import FlexTokConfig, TokenizerObjective, get_preset, split_recorded
from flextok.decoder import Decoder, legacy_adaln_to_official
from flextok.encoder import Encoder
from flextok.fsq import FSQ
from flextok.nested_dropout import sample_keep_k

KIND = "FlexTok"
OBJECTIVE_KEY = "objective"  # metadata: the objective a checkpoint was trained with (JSON), when recorded


@dataclass(frozen=True)
class DetokenizeDefaults:
    """What `detokenize` does when a setting is not given: ours for our models; an official release
    loads with the release's recommended 20 Euler steps, guidance 7.5 with APG (`OFFICIAL_DETOKENIZE`)."""

    steps: int = 25
    guidance_scale: float = 1.0
    apg: bool = False


OFFICIAL_DETOKENIZE = DetokenizeDefaults(steps=20, guidance_scale=7.5, apg=True)


class FlexTok(nn.Module):
    """Image <-> ordered sequence of 1..K discrete tokens, coarse to fine."""

    def __init__(self, config: FlexTokConfig) -> None:
        super().__init__()
        self.config = config
        if config.vae is not None:
            from flextok.vae import VAE  # optional dependency (diffusers)

            self.vae: nn.Module | None = VAE(config.vae)
        else:
            self.vae = None
        self.encoder = Encoder(config)
        self.fsq = FSQ(config.fsq)
        self.decoder = Decoder(config)
        self.checkpoint_id = "unsaved"
        self.checkpoint_sha256: str | None = None
        self.detokenize_defaults = DetokenizeDefaults()

    def init_weights(self) -> None:
        """Encoder and decoder schemes are documented on their `init_weights`; the VAE is frozen."""
        self.encoder.init_weights()
        self.decoder.init_weights()

    @property
    def encoder_only(self) -> bool:
        return self.decoder is None

    def drop_decoder(self) -> FlexTok:
        """Remove what tokenizing never uses (the flow decoder, the VAE's decoder): an encoder-only
        model tokenizes exactly as before; detokenizing or training it is an error."""
        self.decoder = None
        if self.vae is not None:
            self.vae.vae.decoder = None
            self.vae.vae.post_quant_conv = None
        return self

    def _need_decoder(self) -> None:
        if self.decoder is None:
            raise ValueError(f"{self.checkpoint_id} was loaded encoder-only (tokenize only); load it in full to decode or train")

    # Construction --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: FlexTokConfig, device: torch.device | str | None = None) -> FlexTok:
        """Randomly initialised; on the `meta` device nothing is allocated (parameter counts)."""
        with torch.device(device or "cpu"):
            model = cls(config)
            if str(device) != "meta":
                model.init_weights()
        if config.vae is not None and config.vae.path and str(device) != "meta":
            model.vae.load_weights(config.vae.path)
        return model

    @classmethod
    def from_preset(cls, name: str, device: torch.device | str | None = None, **overrides) -> FlexTok:
        config = get_preset(name)
        if overrides:
            config = config.replace(**overrides)
        model = cls.from_config(config, device)
        model.checkpoint_id = f"preset:{name}"
        return model

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: torch.device | str | None = None, *, encoder_only: bool = False,
        sha256: str | None = None,
    ) -> FlexTok:
        """Load our checkpoint or an official FlexTok release (recognised by its key names; its
        config.json, when beside the weights, is read too). A release detokenizes by default with the
        release's recommended settings (`OFFICIAL_DETOKENIZE`).

        `encoder_only` builds and reads only what `tokenize` uses (the VAE's encoder, the encoder and
        FSQ): the flow decoder and the VAE's decoder are neither built nor read from the file (for
        d18_d28, 8.7 of its 10.2 GB in fp32). `sha256`: the file's digest, when the caller has already
        checked it; the whole file is not read again to compute it."""
        from flextok import official

        keep = None
        if encoder_only:
            ours = read_metadata(path).get("kind") == KIND
            keep = is_encoder_key if ours else (lambda k: is_encoder_key(official.map_key(k) or ""))
        state, metadata = load_checkpoint(path, keep=keep)
        # A partial read lacks the decoder's tensors: recognise and size a release from its header.
        shapes = read_shapes(path) if encoder_only else state
        is_official = official.is_official_state_dict(shapes)
        if is_official:
            config = official.infer_config(shapes, official.read_release_config(path))
            state = official.map_state_dict(state, config)
        else:
            config, predates = _config_from_metadata(metadata, path)
            if predates:  # written before the conventions were recorded: DiT's adaLN chunk order
                state = legacy_adaln_to_official(state)
        check_finite(state, path)
        with torch.device("meta"):  # the config is within bounds: building is cheap
            model = cls(config)
        if encoder_only:
            model.drop_decoder()
        model.load_state_dict_strict(state)
        model.checkpoint_id = str(path)
        model.checkpoint_sha256 = sha256 or file_sha256(path)
        if is_official:
            model.detokenize_defaults = OFFICIAL_DETOKENIZE
        return model.to(device) if device is not None else model

    @classmethod
    def config_of(cls, path: str | os.PathLike) -> FlexTokConfig:
        """A checkpoint's config: ours from its metadata alone; an official release from its tensor
        shapes (header only; no weights are read)."""
        from flextok import official

        metadata = read_metadata(path)
        if metadata.get("kind") == KIND:
            return _config_from_metadata(metadata, path)[0]
        shapes = read_shapes(path)
        if official.is_official_state_dict(shapes):
            return official.infer_config(shapes, official.read_release_config(path))
        return cls.from_pretrained(path).config  # neither: the full load gives the one-line error

    @classmethod
    def objective_of(cls, path: str | os.PathLike) -> TokenizerObjective | None:
        """The objective a checkpoint was trained with, where it says (metadata only): ours record it
        beside the config (`OBJECTIVE_KEY`), or, written before the objective left the architecture
        config, inside it; an official release in its config.json. None when nothing is recorded."""
        from flextok import official

        metadata = read_metadata(path)
        if metadata.get("kind") != KIND:
            shapes = read_shapes(path)
            if official.is_official_state_dict(shapes):
                return official.release_objective(official.read_release_config(path))
            cls.from_pretrained(path)  # neither: the one-line error
        try:
            if OBJECTIVE_KEY in metadata:
                return TokenizerObjective.from_dict(json.loads(metadata[OBJECTIVE_KEY]))
            return split_recorded(config_from_metadata(metadata, kind=KIND, path=path))[1]
        except CheckpointError:
            raise
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad tokenizer objective ({e})") from None

    def load_state_dict_strict(self, state: dict[str, torch.Tensor], *, fresh: Sequence[str] = ()) -> None:
        """Load every key exactly (names and shapes); a mismatch is an error listing the keys. The
        parameters named in `fresh` may be absent from `state`: they keep their current values."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state) - set(fresh))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"checkpoint does not match the model: missing {missing[:8]}, unexpected "
                f"{unexpected[:8]}, wrong shape {wrong[:8]} ({len(missing)}/{len(unexpected)}/{len(wrong)})"
            )
        self.load_state_dict(state, strict=not fresh, assign=True)
        # Non-persistent buffers (the FSQ tables) are derived from the config; a model built on
        # `meta` gets them rebuilt on the device the loaded weights live on.
        device = next(self.parameters()).device
        self.fsq = FSQ(self.config.fsq).to(device)

    def load_with_fewer_decoder_blocks(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load a checkpoint of this architecture but with fewer decoder blocks (growing the decoder):
        its blocks become this model's first ones, the others keep their adaLN-zero initialisation,
        under which a block is exactly the identity, so the model starts as the checkpoint's function.
        Returns the names of the parameters that did not come from `state`."""
        prefix, depth = "decoder.blocks.", self.config.decoder_depth
        loaded_depth = len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
        if loaded_depth >= depth:
            raise CheckpointError(f"the checkpoint has {loaded_depth} decoder blocks; growing needs fewer than {depth}")
        for block in self.decoder.blocks[loaded_depth:]:  # identity until trained, whatever init ran before
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        new_blocks = tuple(f"{prefix}{i}." for i in range(loaded_depth, depth))
        fresh = sorted(k for k in self.state_dict() if k.startswith(new_blocks))
        self.load_state_dict_strict(state, fresh=fresh)
        return fresh

    def freeze_tokens(self) -> FlexTok:
        """Freeze everything that defines the tokens (VAE, encoder, FSQ): training then moves only the
        flow decoder, so every token this model emits stays what it was (decoder fine-tuning)."""
        for name, module in self.named_children():
            if name != "decoder":
                module.requires_grad_(False)
        return self

    def save_pretrained(self, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Write `path` (a .safetensors file, or a folder that gets model.safetensors)."""
        out = save_checkpoint(path, self.state_dict(), kind=KIND, config=self.config.to_dict(), extra=extra)
        self.checkpoint_id, self.checkpoint_sha256 = str(out), file_sha256(out)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # Pixels <-> latents ----------------------------------------------------------------------------
    def images_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return self.vae.encode(images) if self.vae is not None else images

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Not clamped (as the release): values may leave [-1, 1]; clamp where images are written or measured."""
        return self.vae.decode(latents) if self.vae is not None else latents

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        expected = (c.image_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [-1, 1], got {images.dtype}")

    # Tokenize / detokenize -----------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> (codes (B, K, d), tokens (B, K))."""
        z = self.encoder(self.images_to_latents(images))
        return self.fsq(z)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> LongTensor (B, K) of token ids, coarse to fine."""
        return self.encode(images.to(self.device))[1]

    def _pad_tokens(self, ids: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, k] tensor (negative = padding) or list of 1D tensors -> (tokens (B, K) zero-padded, keep_k (B,))."""
        K = self.config.num_registers
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2:
                raise ValueError(f"ids must be [B, k] or a list of 1D tensors, got shape {list(ids.shape)}")
            valid = ids >= 0  # (B, k)
            lengths = valid.sum(dim=1)
            if not torch.equal(valid, torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]):
                raise ValueError("negative ids (padding) must come after a row's tokens")
            rows = [row[:n] for row, n in zip(ids.unbind(0), lengths.tolist())]
        else:
            rows = list(ids)
        if not rows:
            raise ValueError("ids is empty")
        lengths = [int(r.numel()) for r in rows]
        if min(lengths) < 1 or max(lengths) > K:
            raise ValueError(f"every token sequence must have 1..{K} tokens, got lengths {sorted(set(lengths))}")
        tokens = torch.zeros(len(rows), K, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            tokens[i, : r.numel()] = torch.as_tensor(r, device=self.device).long().flatten()
        return tokens, torch.tensor(lengths, device=self.device)

    @torch.no_grad()
    def tokenize_adaptive(self, images: torch.Tensor, target: LengthTarget) -> AdaptiveTokens:
        """images (B, 3, H, W) in [-1, 1] -> all K tokens plus, per image, the shortest prefix length
        whose reconstruction meets `target`, measured in one batched one-step decoder call
        (`flextok.adaptive`). Needs the decoder, unlike `tokenize`."""
        self._need_decoder()
        return choose_lengths(self, images, target)

    @torch.no_grad()
    def detokenize(
        self,
        ids: torch.Tensor | Sequence[torch.Tensor],
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        apg: bool | flow.APGConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Token prefixes of any lengths 1..K (one batched call) -> images (B, 3, H, W), nominally in
        [-1, 1] but NOT clamped (as the release; `images.clamp(-1, 1)` before writing or measuring).

        Settings left None come from `self.detokenize_defaults`: 25 steps, no guidance for our
        models; 20 steps, guidance 7.5 with APG for an official release. `ids`: a (B, k) tensor, whose
        negative entries (after a row's tokens) are padding, as generators with an end-of-sequence
        token return them; or a list of 1D tensors."""
        latents = self.detokenize_latents(ids, steps=steps, guidance_scale=guidance_scale, apg=apg, generator=generator)
        return self.latents_to_images(latents)

    @torch.no_grad()
    def detokenize_latents(
        self,
        ids: torch.Tensor | Sequence[torch.Tensor],
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        apg: bool | flow.APGConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`detokenize` up to the flow sampler's output: latents (B, c, h, w) before the VAE decode."""
        defaults = self.detokenize_defaults
        steps = defaults.steps if steps is None else steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        apg = defaults.apg if apg is None else apg
        self._need_decoder()
        tokens, keep_k = self._pad_tokens(ids)
        B = tokens.shape[0]
        codes = self.fsq.tokens_to_codes(tokens)  # (B, K, d)
        cond = self.decoder.embed_registers(codes, keep_k)  # (B, K, D)
        uncond = self.decoder.embed_registers(codes, keep_k, torch.ones(B, dtype=torch.bool, device=self.device))
        both = torch.cat([cond, uncond])  # (2B, K, D)

        def velocity(x: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
            return self.decoder(x, t, both if with_uncond else cond)

        c = self.config
        noise = flow.randn((B, c.latent_channels, c.latent_size, c.latent_size), generator=generator, device=self.device)
        return flow.euler_sample(velocity, noise, steps=steps, guidance_scale=guidance_scale, apg=apg)

    # Training ------------------------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None,
        objective: TokenizerObjective | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training step's losses under `objective` (default: `TokenizerObjective()`):
        {"loss", "flow_mse"} (and nothing that needs a host sync)."""
        self._need_decoder()
        c = self.config
        o = objective if objective is not None else TokenizerObjective()
        # The flow (time, noise, x_t, target) is formed in fp32 whatever the autocast: a bf16 VAE output
        # would otherwise round t = 0.9985 to 1.0 inside `add_noise` and quantise the noise and target.
        latents = self.images_to_latents(images).float()
        B = latents.shape[0]
        codes, _ = self.fsq(self.encoder(latents))
        keep_k = sample_keep_k(
            B, c.num_registers, o.nested_dropout_mode, full_fraction=o.full_k_fraction, generator=generator,
            device=latents.device,
        )
        gen_device = generator.device if generator is not None else latents.device
        drop = (torch.rand(B, generator=generator, device=gen_device) < o.cond_dropout_prob).to(latents.device)
        registers = self.decoder.embed_registers(codes, keep_k, drop)
        t = flow.sample_time(
            B, mode=o.time_sampling, uniform_fraction=o.uniform_time_fraction, noise_fraction=o.noise_time_fraction,
            generator=generator, device=latents.device,
        )
        noise = flow.randn(tuple(latents.shape), generator=generator, device=latents.device)
        velocity = self.decoder(flow.add_noise(latents, noise, t), t, registers)
        loss = flow.flow_loss(velocity, latents, noise)
        return {"loss": loss, "flow_mse": loss.detach()}


def _config_from_metadata(metadata: dict[str, str], path: Any) -> tuple[FlexTokConfig, bool]:
    """A checkpoint's recorded config, validated (types and bounds): a broken or hostile one is one line.
    Also whether it predates the recorded numerical conventions (`FlexTokConfig.from_recorded`). An
    objective recorded inside the config (older checkpoints) is validated too, and left out."""
    try:
        return FlexTokConfig.from_recorded(config_from_metadata(metadata, kind=KIND, path=path))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad tokenizer config ({e})") from None


def is_encoder_key(name: str) -> bool:
    """Whether a parameter of ours is used by `tokenize` (VAE encoder, encoder; FSQ has none)."""
    return name.startswith(("encoder.", "vae.vae.encoder.", "vae.vae.quant_conv."))


def load_tokenizer(
    spec: str | os.PathLike, device: torch.device | str | None = None, *, encoder_only: bool = False,
    sha256: str | None = None,
) -> FlexTok:
    """A preset name (random weights) or a checkpoint path — the form CLIs accept for `--model`;
    `sha256` as `FlexTok.from_pretrained` takes it."""
    from flextok.config import TOKENIZER_PRESETS

    if isinstance(spec, str) and spec in TOKENIZER_PRESETS and not Path(spec).exists():
        model = FlexTok.from_preset(spec, device=device)
        return model.drop_decoder() if encoder_only else model
    resolve_weights_path(spec)  # one clear error for a missing path
    return FlexTok.from_pretrained(spec, device=device, encoder_only=encoder_only, sha256=sha256)
