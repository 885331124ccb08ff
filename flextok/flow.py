"""Rectified flow: the noise process, its training loss, and the guided Euler sampler.

Time convention (the one place it is written down):
    t = 0 is data, t = 1 is pure Gaussian noise;
    x_t = t * noise + (1 - t) * x0;
    the network predicts the velocity v = dx_t/dt = noise - x0, trained with MSE;
    sampling integrates from t = 1 down to t = 0 with Euler steps: x_{t - dt} = x_t - dt * v.
Training times are logit-normal, t = sigmoid(n) with n ~ N(0, 1), optionally mixed with uniform t.

Guidance: classifier-free guidance combines a conditional and an unconditional velocity, computed in
one batched forward of 2B rows; adaptive projected guidance (APG, Sadat et al. 2024) optionally
replaces the plain combination, acting on the velocities themselves (as the FlexTok release does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def randn(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, then moved: a CPU generator seeds CUDA runs too."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def sample_time(
    batch_size: int,
    *,
    mode: str = "logit_normal",
    uniform_fraction: float = 0.0,
    noise_fraction: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(B,) training times in (0, 1), of which a `noise_fraction` share is exactly 1 (pure noise)."""
    if mode == "uniform":
        uniform_fraction = 1.0
    elif mode != "logit_normal":
        raise ValueError(f"unknown time sampling mode {mode!r}")
    n = randn((batch_size,), generator=generator, device=device)
    t = torch.sigmoid(n)
    if uniform_fraction > 0:
        u = torch.rand((batch_size,), generator=generator, device=generator.device if generator else device).to(device)
        pick = torch.rand((batch_size,), generator=generator, device=generator.device if generator else device).to(device)
        t = torch.where(pick < uniform_fraction, u, t)
    if noise_fraction > 0:
        gen_device = generator.device if generator is not None else device
        at_noise = torch.rand((batch_size,), generator=generator, device=gen_device).to(device) < noise_fraction
        t = torch.where(at_noise, torch.ones_like(t), t)
    return t


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t * noise + (1 - t) * x0, with t broadcast over the non-batch dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return t * noise + (1 - t) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(predicted_velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity (fp32)."""
    return (predicted_velocity.float() - velocity_target(x0, noise).float()).pow(2).mean()


@dataclass(frozen=True, kw_only=True)
class APGConfig:
    """Adaptive projected guidance; defaults as used by the FlexTok release."""

    momentum: float = -0.5
    eta: float = 0.0
    norm_threshold: float = 2.5


class _APGState:
    """Momentum buffer of APG, alive for one sampling run."""

    def __init__(self, config: APGConfig) -> None:
        self.config = config
        self.running: torch.Tensor | None = None

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Per sample (norms and dot products over every non-batch dim):
        d = cond - uncond; running = d + momentum * running (from 0); d = running * min(1, threshold / |d|);
        d = parallel + orthogonal with respect to `cond` (in float64);
        result = cond + (scale - 1) * (orthogonal + eta * parallel)."""
        cfg = self.config
        diff = cond - uncond
        self.running = diff if self.running is None else diff + cfg.momentum * self.running
        update = self.running
        dims = tuple(range(1, update.dim()))
        if cfg.norm_threshold > 0:
            norm = update.norm(p=2, dim=dims, keepdim=True)
            update = update * torch.clamp(cfg.norm_threshold / norm.clamp_min(1e-12), max=1.0)
        u, c = update.double(), cond.double()
        unit = c / c.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
        parallel = (u * unit).sum(dim=dims, keepdim=True) * unit
        orthogonal = u - parallel
        return cond + (scale - 1) * (orthogonal + cfg.eta * parallel).to(cond.dtype)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 is the conditional."""
    return uncond + scale * (cond - uncond)


# velocity_fn(x (2B or B, ...), t (2B or B,), uncond_rows: bool) -> velocity
VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    *,
    steps: int = 25,
    guidance_scale: float = 1.0,
    apg: bool | APGConfig = False,
) -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 (data) in `steps` Euler steps.

    `velocity_fn(x, t, with_uncond)`: with `with_uncond` false it returns the conditional velocity of
    the B rows; with it true it is given 2B rows `[x ; x]` and returns `[v_cond ; v_uncond]` from one
    batched forward. Guidance runs only when `guidance_scale != 1` or APG is on.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    apg_state = _APGState(apg if isinstance(apg, APGConfig) else APGConfig()) if apg else None
    guided = guidance_scale != 1.0 or apg_state is not None
    x = noise
    B = x.shape[0]
    times = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        tb = t.expand(B)
        if not guided:
            v = velocity_fn(x, tb, False)
        else:
            v_both = velocity_fn(torch.cat([x, x]), torch.cat([tb, tb]), True)
            v_cond, v_uncond = v_both[:B], v_both[B:]
            if apg_state is None:
                v = cfg_combine(v_cond, v_uncond, guidance_scale)
            else:
                v = apg_state.guide(v_cond, v_uncond, guidance_scale)
        x = x + (t_next - t) * v
    return x
