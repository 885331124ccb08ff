"""The rectified-flow process: time convention, exact-velocity Euler, guidance."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextok import flow


def test_time_convention_t0_is_data_t1_is_noise():
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(flow.add_noise(x0, noise, torch.zeros(4)), x0)
    assert torch.equal(flow.add_noise(x0, noise, torch.ones(4)), noise)
    # The velocity target is d x_t / d t.
    t, dt = torch.full((4,), 0.3), 1e-3
    finite = (flow.add_noise(x0, noise, t + dt) - flow.add_noise(x0, noise, t)) / dt
    assert torch.allclose(finite, flow.velocity_target(x0, noise), atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(steps=st.integers(1, 30), seed=st.integers(0, 1000))
def test_euler_with_exact_velocity_reaches_a_point_target(steps, seed):
    # Data = a single point c: the exact field is v(x, t) = (x - c) / t, and paths are straight,
    # so Euler lands on c whatever the number of steps.
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(1, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    out = flow.euler_sample(lambda x, t, _: (x - c) / t.view(-1, 1, 1, 1), noise, steps=steps)
    assert torch.allclose(out, c.expand_as(out), atol=1e-4)


def test_euler_with_exact_velocity_reaches_a_gaussian_target():
    # Data ~ N(mu, s^2) per dim: x_t = t e + (1 - t) x0 is Gaussian with variance t^2 + (1-t)^2 s^2,
    # and the exact velocity is E[e - x0 | x_t], linear in x_t.
    mu, s = 2.0, 0.5

    def velocity(x, t, _):
        t = t.view(-1, 1)
        var = t**2 + (1 - t) ** 2 * s**2
        mean = (1 - t) * mu
        e_hat = t * (x - mean) / var
        x0_hat = mu + (1 - t) * s**2 * (x - mean) / var
        return e_hat - x0_hat

    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    out = flow.euler_sample(velocity, noise, steps=200)
    assert abs(out.mean().item() - mu) < 0.02
    assert abs(out.std().item() - s) < 0.02


def _two_field(cond_shift: float, uncond_shift: float, calls: list):
    def velocity(x, t, with_uncond):
        calls.append((x.shape[0], with_uncond))
        if not with_uncond:
            return x + cond_shift
        B = x.shape[0] // 2
        return torch.cat([x[:B] + cond_shift, x[B:] + uncond_shift])

    return velocity


def test_cfg_batches_conditional_and_unconditional_rows_in_one_forward():
    calls = []
    noise = torch.randn(3, 2)
    flow.euler_sample(_two_field(1.0, -1.0, calls), noise, steps=4, guidance_scale=3.0)
    assert calls == [(6, True)] * 4  # one forward of 2B rows per step


def test_cfg_at_scale_one_equals_the_conditional_prediction():
    noise = torch.randn(3, 2)
    cond_only = flow.euler_sample(_two_field(1.0, -1.0, []), noise, steps=5)
    # Force the batched guided path at scale 1 (APG with no momentum and no threshold reduces to CFG).
    apg_one = flow.euler_sample(
        _two_field(1.0, -1.0, []), noise, steps=5, guidance_scale=1.0,
        apg=flow.APGConfig(momentum=0.0, norm_threshold=0.0, eta=1.0),
    )
    assert torch.allclose(cond_only, apg_one, atol=1e-5)
    assert torch.allclose(flow.cfg_combine(torch.ones(2), torch.zeros(2), 1.0), torch.ones(2))


def test_guidance_moves_away_from_the_unconditional_field():
    noise = torch.zeros(2, 2)
    plain = flow.euler_sample(_two_field(1.0, -1.0, []), noise, steps=4)
    guided = flow.euler_sample(_two_field(1.0, -1.0, []), noise, steps=4, guidance_scale=2.0)
    # v_guided = v_u + 2 (v_c - v_u) = x + 3: integrating from 1 to 0 subtracts more.
    assert (guided < plain).all()


def test_apg_clips_the_guidance_norm():
    state = flow._APGState(flow.APGConfig(momentum=0.0, norm_threshold=1.0, eta=1.0))
    cond = torch.tensor([[1.0, 0.0]])
    uncond = torch.tensor([[-100.0, 0.0]])
    out = state.guide(cond, uncond, scale=2.0)
    assert torch.allclose(out, torch.tensor([[2.0, 0.0]]))  # diff clipped to norm 1


def test_time_sampling_is_in_range_and_seeded():
    a = flow.sample_time(1000, uniform_fraction=0.3, generator=torch.Generator().manual_seed(0))
    b = flow.sample_time(1000, uniform_fraction=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert (a > 0).all() and (a < 1).all()
    # Logit-normal puts little mass above 0.95; a uniform mix puts ~0.3 * 5% there.
    ln = flow.sample_time(20000, generator=torch.Generator().manual_seed(1))
    mixed = flow.sample_time(20000, uniform_fraction=1.0, generator=torch.Generator().manual_seed(1))
    assert (ln > 0.95).float().mean() < 0.01 < (mixed > 0.95).float().mean()


@settings(deadline=None, max_examples=20)
@given(noise=st.sampled_from([0.0, 0.25, 0.5, 1.0]), mode=st.sampled_from(["logit_normal", "uniform"]))
def test_a_noise_time_fraction_of_examples_sits_exactly_at_pure_noise(noise, mode):
    g = torch.Generator().manual_seed(0)
    t = flow.sample_time(20_000, mode=mode, uniform_fraction=0.3, noise_fraction=noise, generator=g)
    share = (t == 1.0).double().mean().item()
    assert abs(share - noise) < 0.015  # binomial std at n = 20,000 is <= 0.0036
    assert bool(((t > 0) & (t <= 1)).all())
    if noise < 1:  # the other examples keep their distribution: not pushed to t = 1
        rest = t[t < 1]
        assert 0.4 < rest.mean().item() < 0.6


@pytest.mark.parametrize("field", ["noise_time_fraction", "full_k_fraction"])
def test_training_fractions_are_validated_and_round_trip(field):
    from flextok.config import TokenizerObjective, get_objective

    objective = get_objective("tiny").replace(**{field: 0.5})
    assert TokenizerObjective.from_dict(objective.to_dict()) == objective
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=field):
            get_objective("tiny").replace(**{field: bad})


def test_cfg_hand_worked():
    # uncond + s (cond - uncond) = (0, 1) + 3 (1, 1)
    out = flow.cfg_combine(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]), 3.0)
    assert torch.equal(out, torch.tensor([[3.0, 4.0]]))


# Two steps of APG worked by hand with the release's settings (momentum -0.5, threshold 2.5, eta 0,
# scale 7.5), for a 2-value sample:
#   step 1: cond (3, 0), uncond (3, -4): d = (0, 4); running = d; |d| = 4 > 2.5 -> (0, 2.5);
#           parallel to cond (1, 0): 0 -> guided = (3, 0) + 6.5 (0, 2.5) = (3, 16.25)
#   step 2: cond (0, 2), uncond (-1, 1): d = (1, 1); running = d - 0.5 (0, 4) = (1, -1) (the buffer
#           keeps the unclipped value); |.| = 1.41 < 2.5; parallel to (0, 1): (0, -1), orthogonal
#           (1, 0) -> guided = (0, 2) + 6.5 (1, 0) = (6.5, 2)
APG_STEPS = [((3.0, 0.0), (3.0, -4.0), (3.0, 16.25)), ((0.0, 2.0), (-1.0, 1.0), (6.5, 2.0))]


def test_apg_two_steps_hand_worked():
    state = flow._APGState(flow.APGConfig())
    for cond, uncond, guided in APG_STEPS:
        out = state.guide(torch.tensor([cond]), torch.tensor([uncond]), 7.5)
        assert torch.allclose(out, torch.tensor([guided]), atol=1e-6)


def test_apg_norms_are_per_sample_over_every_non_batch_dim():
    # Sample 0 as (C, H, W) = (1, 2, 1) is step 1 above (clipped); sample 1 is the same direction but
    # small (|d| = 0.4, not clipped): a norm over the batch would clip both, one per value neither.
    cond = torch.tensor([[3.0, 0.0], [3.0, 0.0]]).view(2, 1, 2, 1)
    uncond = torch.tensor([[3.0, -4.0], [3.0, -0.4]]).view(2, 1, 2, 1)
    out = flow._APGState(flow.APGConfig()).guide(cond, uncond, 7.5).view(2, 2)
    assert torch.allclose(out, torch.tensor([[3.0, 16.25], [3.0, 2.6]]), atol=1e-6)


def test_euler_sample_applies_apg_to_the_velocities():
    """Two Euler steps (t = 1 -> 0.5 -> 0) with fields that return the hand-worked velocities whatever x:
    x_0 = x_1 - 0.5 (3, 16.25) - 0.5 (6.5, 2) = x_1 - (4.75, 9.125). APG on the implied clean samples
    x - t v instead would give another result."""
    calls = iter(APG_STEPS)

    def velocity(x, t, with_uncond):
        cond, uncond, _ = next(calls)
        return torch.tensor([cond, uncond])

    x1 = torch.tensor([[0.5, -1.0]])
    out = flow.euler_sample(velocity, x1, steps=2, guidance_scale=7.5, apg=True)
    assert torch.allclose(out, x1 - torch.tensor([[4.75, 9.125]]), atol=1e-6)
