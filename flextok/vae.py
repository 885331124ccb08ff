"""A frozen diffusers `AutoencoderKL` wrapped for FlexTok: images in [-1, 1] <-> scaled latents.

Owns: building the VAE architecture from `VAEConfig`, loading its weights from a local path, and the
latent scaling. diffusers is an optional dependency (`pip install 'flextok-at-scale[vae]'`).
"""

from __future__ import annotations

import torch
from torch import nn

from flextok.checkpoint import load_checkpoint
from flextok.config import VAEConfig


def _autoencoder_cls():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError(
            "latent-space FlexTok presets need diffusers: pip install 'flextok-at-scale[vae]'"
        ) from None
    return AutoencoderKL


class VAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        n = len(config.block_out_channels)
        self.vae = _autoencoder_cls()(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_num_groups,
            act_fn="silu",
        )
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, path: str) -> None:
        """Load diffusers weights (a folder with diffusion_pytorch_model.safetensors, or the file)."""
        state, _ = load_checkpoint(path)
        missing, unexpected = self.vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"VAE weights at {path} do not match the architecture: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )

    def train(self, mode: bool = True) -> VAE:
        return super().train(False)  # always frozen

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, c, H/8, W/8) scaled latents.

        Always the posterior mean, deliberately: tokens are a deterministic function of the image (the
        release's config may say `sample_posterior`; a sample would make every tokenization differ)."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.mean * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) scaled latents -> (B, 3, H, W) images, NOT clamped (values may leave [-1, 1]
        slightly, as in the release): clamp where an image is written or measured."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.config.scaling_factor).sample
