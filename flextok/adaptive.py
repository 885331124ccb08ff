"""Adaptive token counts: per image, the shortest prefix whose reconstruction meets a quality target.

Owns: `LengthTarget` (what "good enough" means and which prefix lengths are candidates), the batched
search (`choose_lengths`) and its result `AdaptiveTokens`. Does not own: the networks or the sampler
(`flextok.tokenizer`, `flextok.flow`).

How the search measures a prefix: it decodes every candidate prefix of every image of a batch in
ONE decoder call, with ONE Euler step from t = 1, in the tokenizer's latent space (no VAE decode):
    x0_hat = noise - v(noise, t = 1, registers(prefix)),
the clean-latent prediction of the flow at pure noise. At t = 1 the noise carries no information
about the image, so the ideal velocity there is v = noise - E[x0 | prefix] and x0_hat is the mean
reconstruction the prefix implies, whatever the noise draw: a ranking of prefix lengths by one
forward pass. Its error is the per-image mean squared error against the image's latents (for a
tokenizer without a VAE: pixels in [-1, 1], unclamped).

The noise is one fixed map, `torch.Generator().manual_seed(target.noise_seed)` drawn with shape
(1, C, H, W), shared by every image and candidate, so a measured error does not depend on the batch:
`FlexTok.detokenize_latents(prefix, steps=1, generator=torch.Generator().manual_seed(seed))` of one
image reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flextok import flow


@dataclass(frozen=True, kw_only=True)
class LengthTarget:
    """When a prefix is good enough. Exactly one of the two targets is set.

    Args:
        max_relative_error: r; the prefix's error may be at most (1 + r) x the error of all K tokens
            (0.1: within 10 % of the full reconstruction). All K always meets it.
        max_error: e; an absolute bound on the prefix's latent MSE. An image that misses it even at K
            keeps all K tokens (and is counted as missing its target).
        candidates: the prefix lengths tried, ascending; None = every length 1..K; "pow2" = 1, 2, 4,
            .. up to K. K is always tried. Cost: every candidate is one decoder row per image.
        noise_seed: seeds the one noise map of the measurement (see the module docstring).
    """

    max_relative_error: float | None = None
    max_error: float | None = None
    candidates: tuple[int, ...] | str | None = None
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if (self.max_relative_error is None) == (self.max_error is None):
            raise ValueError("a length target needs exactly one of max_relative_error and max_error")
        bound = self.max_relative_error if self.max_error is None else self.max_error
        if not bound >= 0:  # also refuses NaN
            raise ValueError(f"a length target's bound must be >= 0, got {bound}")
        if isinstance(self.candidates, str):
            if self.candidates != "pow2":
                raise ValueError(f"candidates must be lengths, 'pow2' or None, got {self.candidates!r}")
        elif self.candidates is not None:
            candidates = tuple(int(k) for k in self.candidates)
            if not candidates or min(candidates) < 1 or list(candidates) != sorted(set(candidates)):
                raise ValueError(f"candidate lengths must be ascending, distinct and >= 1, got {self.candidates}")
            object.__setattr__(self, "candidates", candidates)

    def lengths(self, num_registers: int) -> tuple[int, ...]:
        """The candidate lengths for a tokenizer of K registers (ascending, ending in K)."""
        if self.candidates is None:
            return tuple(range(1, num_registers + 1))
        if self.candidates == "pow2":
            return (*(2**i for i in range(num_registers.bit_length()) if 2**i < num_registers), num_registers)
        if self.candidates[-1] > num_registers:
            raise ValueError(f"candidate length {self.candidates[-1]} exceeds the tokenizer's K = {num_registers}")
        return self.candidates if self.candidates[-1] == num_registers else (*self.candidates, num_registers)

    def describe(self) -> dict:
        """JSON-able form (manifests, file metadata)."""
        return {"max_relative_error": self.max_relative_error, "max_error": self.max_error,
                "candidates": list(self.candidates) if isinstance(self.candidates, tuple) else self.candidates,
                "noise_seed": self.noise_seed, "measure": "latent MSE of a one-step decode"}


@dataclass(frozen=True)
class AdaptiveTokens:
    """What `choose_lengths` found for a batch of B images over C candidate lengths."""

    tokens: torch.Tensor  # (B, K) every token, coarse to fine
    num_tokens: torch.Tensor  # (B,) the chosen prefix length
    mse: torch.Tensor  # (B,) latent MSE of the chosen prefix
    full_mse: torch.Tensor  # (B,) latent MSE of all K tokens
    meets_target: torch.Tensor  # (B,) bool; False only under max_error, where even K misses it
    candidate_lengths: torch.Tensor  # (C,) ascending, ending in K
    candidate_mse: torch.Tensor  # (B, C) latent MSE of every candidate prefix

    def prefixes(self) -> list[torch.Tensor]:
        """The chosen prefixes as ragged 1D tensors (what `detokenize` takes)."""
        return [row[:k] for row, k in zip(self.tokens, self.num_tokens.tolist())]


def measurement_noise(shape: tuple[int, int, int], seed: int, device: torch.device | str) -> torch.Tensor:
    """(1, C, H, W): the noise map `detokenize_latents(..., generator=Generator().manual_seed(seed))`
    draws for a batch of one."""
    return flow.randn((1, *shape), generator=torch.Generator().manual_seed(seed), device=device)


@torch.no_grad()
def choose_lengths(model, images: torch.Tensor, target: LengthTarget) -> AdaptiveTokens:
    """Tokenize `images` (B, 3, H, W) in [-1, 1] and pick each image's shortest candidate prefix that
    meets `target` (see the module docstring for how a prefix is measured)."""
    c = model.config
    latents = model.images_to_latents(images.to(model.device))  # (B, C_lat, h, w)
    codes, tokens = model.fsq(model.encoder(latents))  # (B, K, d), (B, K): `encode`, keeping the latents
    B, K = tokens.shape
    lengths = torch.tensor(target.lengths(K), device=latents.device)  # (C,)
    C = lengths.numel()
    # Row b * C + j decodes image b's prefix of length lengths[j].
    registers = model.decoder.embed_registers(codes.repeat_interleave(C, 0), lengths.repeat(B))  # (B*C, K, D)
    noise = measurement_noise((c.latent_channels, c.latent_size, c.latent_size), target.noise_seed, latents.device)
    noise = noise.to(latents.dtype).expand(B * C, -1, -1, -1)
    t = torch.ones(B * C, device=latents.device)
    velocity = model.decoder(noise, t, registers)
    predicted = (noise - velocity).float().view(B, C, *latents.shape[1:])  # one Euler step, t = 1 -> 0
    candidate_mse = (predicted - latents.float().unsqueeze(1)).pow(2).flatten(2).mean(-1)  # (B, C)
    full_mse = candidate_mse[:, -1]
    if target.max_error is None:
        bound = (1.0 + target.max_relative_error) * full_mse  # (B,)
    else:
        bound = torch.full_like(full_mse, target.max_error)
    ok = candidate_mse <= bound[:, None]  # (B, C)
    meets = ok.any(dim=1)
    # First candidate that is good enough; none (absolute target missed): all K tokens.
    first = torch.where(meets, ok.int().argmax(dim=1), torch.full_like(full_mse, C - 1, dtype=torch.long))
    return AdaptiveTokens(
        tokens=tokens,
        num_tokens=lengths[first],
        mse=candidate_mse.gather(1, first[:, None]).squeeze(1),
        full_mse=full_mse,
        meets_target=meets,
        candidate_lengths=lengths,
        candidate_mse=candidate_mse,
    )
