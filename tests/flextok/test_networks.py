"""Encoder causality, nested-dropout masking and decoder prefix independence, checked numerically."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextok.encoder import causal_last_mask
from flextok.layers import patchify, unpatchify
from flextok.nested_dropout import keep_mask, sample_keep_k


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


def _encoder_outputs(model, latents, registers=None):
    enc = model.encoder
    if registers is not None:
        saved = enc.registers.data.clone()
        enc.registers.data.copy_(registers)
    try:
        return enc(latents)
    finally:
        if registers is not None:
            enc.registers.data.copy_(saved)


def test_mask_shape_and_rules():
    m = causal_last_mask(3, 4)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # patches see patches only
    assert m[3:, :3].all()  # registers see all patches
    assert torch.equal(m[3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())


@settings(max_examples=8, deadline=None)
@given(j=st.integers(0, 31))
def test_perturbing_register_j_leaves_earlier_registers_unchanged(model, j):
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base = _encoder_outputs(model, latents)
    regs = model.encoder.registers.data.clone()
    regs[j] += torch.randn(regs.shape[1]) * 3
    out = _encoder_outputs(model, latents, regs)
    assert torch.allclose(out[:, :j], base[:, :j], atol=1e-5)
    assert not torch.allclose(out[:, j], base[:, j], atol=1e-4)


def test_perturbing_one_patch_changes_every_register(model):
    latents = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    base = model.encoder(latents)
    bumped = latents.clone()
    bumped[:, :, 28:, 28:] += 1.0  # the last 4x4 patch only
    out = model.encoder(bumped)
    changed = (out - base).abs().amax(dim=-1) > 1e-6  # (1, K)
    assert changed.all()


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 32))
def test_positions_at_or_after_k_hold_exactly_the_mask_token(model, k):
    codes = model.fsq.tokens_to_codes(torch.randint(0, 1000, (3, 32)))
    regs = model.decoder.embed_registers(codes, torch.full((3,), k))
    assert torch.equal(regs[:, k:], model.decoder.mask_token.expand(3, 32 - k, -1))
    if k > 0:
        assert not torch.equal(regs[:, :k], model.decoder.mask_token.expand(3, k, -1))


def test_null_condition_replaces_every_register(model):
    codes = model.fsq.tokens_to_codes(torch.randint(0, 1000, (2, 32)))
    regs = model.decoder.embed_registers(codes, torch.tensor([5, 32]), torch.tensor([True, False]))
    assert torch.equal(regs[0], model.decoder.null_cond.expand(32, -1))
    assert not torch.equal(regs[1], model.decoder.null_cond.expand(32, -1))


@settings(max_examples=6, deadline=None)
@given(k=st.integers(1, 31))
def test_decoder_output_ignores_tokens_beyond_k(model, k):
    g = torch.Generator().manual_seed(k)
    tokens = torch.randint(0, 1000, (1, 32), generator=g)
    other = tokens.clone()
    other[:, k:] = torch.randint(0, 1000, (1, 32 - k), generator=g)
    a = model.detokenize(tokens[:, :k], steps=2, generator=torch.Generator().manual_seed(0))
    b = model.detokenize([other[0, :k]], steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # ...while the tokens before k do matter.
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 1000
    c = model.detokenize(changed[:, :k], steps=2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(c, a, atol=1e-6)


def test_sample_keep_k_modes():
    g = torch.Generator().manual_seed(0)
    k = sample_keep_k(4000, 32, "uniform", generator=g)
    assert k.min() == 1 and k.max() == 32 and k.unique().numel() == 32
    k2 = sample_keep_k(4000, 32, "pow2", generator=g)
    assert set(k2.unique().tolist()) == {1, 2, 4, 8, 16, 32}
    k3 = sample_keep_k(2000, 24, "pow2", generator=g)
    assert set(k3.unique().tolist()) == {1, 2, 4, 8, 16, 24}
    assert keep_mask(torch.tensor([0, 2]), 3).tolist() == [[False] * 3, [True, True, False]]


@settings(max_examples=20, deadline=None)
@given(full=st.sampled_from([0.0, 0.25, 0.5, 1.0]), mode=st.sampled_from(["uniform", "pow2"]),
       K=st.sampled_from([8, 24, 32]))
def test_a_full_fraction_of_samples_keeps_every_register(full, mode, K):
    n = 20_000
    k = sample_keep_k(n, K, mode, full_fraction=full, generator=torch.Generator().manual_seed(0))
    assert bool(((k >= 1) & (k <= K)).all())
    # k = K comes from the full share plus the mode's own share of K: 1/K (uniform) or 1/#powers (pow2).
    choices = K if mode == "uniform" else len([c for c in range(1, K + 1) if c & (c - 1) == 0 or c == K])
    expected = full + (1 - full) / choices
    assert abs((k == K).double().mean().item() - expected) < 0.015  # binomial std <= 0.0036
    if full < 1:  # the rest keep the mode's distribution over 1..K-1
        rest = k[k < K]
        assert rest.min().item() == 1 and rest.unique().numel() == choices - 1


@settings(max_examples=10, deadline=None)
@given(p=st.sampled_from([1, 2, 4]), c=st.integers(1, 4), g=st.integers(1, 4))
def test_patchify_round_trip(p, c, g):
    x = torch.randn(2, c, g * p, g * p)
    assert torch.equal(unpatchify(patchify(x, p), p, c), x)


@settings(max_examples=25, deadline=None)
@given(
    num_patches=st.integers(1, 24),
    num_registers=st.integers(1, 12),
    heads=st.integers(1, 3),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_split_causal_last_attention_equals_the_boolean_mask(num_patches, num_registers, heads, batch, seed):
    """Two mask-free SDPA calls (patches over patches; registers over all with a lower-right causal
    bias) compute exactly what the boolean causal-last mask computes."""
    from flextok.layers import Attention, CausalLast

    torch.manual_seed(seed)
    attn = Attention(16 * heads, 16, 1e-5)
    x = torch.randn(batch, num_patches + num_registers, 16 * heads)
    masked = attn(x, causal_last_mask(num_patches, num_registers))
    split = attn(x, CausalLast(num_patches))
    torch.testing.assert_close(split, masked, atol=2e-6, rtol=1e-5)


def test_split_attention_is_not_plain_causal_or_full():
    """The comparison above can fail: the split differs from an unmasked call and from the registers'
    call with an upper-left causal alignment (`is_causal=True`: register i would see keys 0..i only)."""
    from flextok.layers import Attention, CausalLast

    torch.manual_seed(0)
    attn = Attention(32, 16, 1e-5)
    N, K = 6, 4
    x = torch.randn(2, N + K, 32)
    split = attn(x, CausalLast(N))
    upper_left = causal_last_mask(N, K)
    upper_left[N:] = torch.ones(K, N + K, dtype=torch.bool).tril()  # register i sees keys 0..i
    assert not torch.allclose(split, attn(x, None), atol=1e-4)
    assert not torch.allclose(split[:, N:], attn(x, upper_left)[:, N:], atol=1e-4)


def test_encoder_split_attention_gives_the_masked_encoders_tokens(model):
    latents = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    enc = model.encoder
    assert enc.use_split_attention  # the default path
    with torch.no_grad():
        split = enc(latents)
        enc.use_split_attention = False
        try:
            masked = enc(latents)
        finally:
            enc.use_split_attention = True
    torch.testing.assert_close(split, masked, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.fsq(split)[1], model.fsq(masked)[1])
