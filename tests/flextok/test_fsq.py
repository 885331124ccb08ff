import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextok.config import FSQConfig
from flextok.fsq import FSQ

levels_st = st.lists(st.integers(min_value=2, max_value=9), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(levels=levels_st)
def test_every_token_survives_tokens_to_codes_to_tokens(levels):
    fsq = FSQ(FSQConfig(levels=levels))
    tokens = torch.arange(fsq.codebook_size)
    codes = fsq.tokens_to_codes(tokens)
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_tokens(codes), tokens)


@settings(max_examples=40, deadline=None)
@given(levels=levels_st, seed=st.integers(0, 2**16))
def test_quantize_yields_exactly_the_level_grid(levels, seed):
    fsq = FSQ(FSQConfig(levels=levels))
    z = torch.randn(512, len(levels), generator=torch.Generator().manual_seed(seed)) * 4
    codes, tokens = fsq(z)
    assert codes.min() >= -1 and codes.max() <= 1
    assert tokens.min() >= 0 and tokens.max() < fsq.codebook_size
    # Each dim takes one of exactly L values, and the codes are what the tokens decode to.
    assert torch.equal(fsq.tokens_to_codes(tokens), codes)
    for i, n in enumerate(levels):
        assert codes[:, i].unique().numel() <= n


def test_paper_basis_and_codebook():
    fsq = FSQ(FSQConfig())
    assert fsq.codebook_size == 64000
    assert fsq.basis.tolist() == [1, 8, 64, 512, 2560, 12800]


def test_extreme_inputs_reach_every_level():
    fsq = FSQ(FSQConfig(levels=(8, 5)))
    z = torch.linspace(-20, 20, 2001).unsqueeze(1).expand(-1, 2)
    codes = fsq.quantize(z)
    assert codes[:, 0].unique().numel() == 8
    assert codes[:, 1].unique().numel() == 5


def test_straight_through_gradient_is_nonzero():
    fsq = FSQ(FSQConfig(levels=(8, 5, 5, 5)))
    z = torch.randn(16, 4, requires_grad=True)
    codes, _ = fsq(z)
    (codes * torch.randn_like(codes)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_out_of_range_tokens_are_refused():
    fsq = FSQ(FSQConfig(levels=(4, 4)))
    try:
        fsq.tokens_to_codes(torch.tensor([16]))
    except ValueError as e:
        assert "[0, 16)" in str(e)
    else:
        raise AssertionError("token 16 of a 16-code book was accepted")


def test_bound_uses_the_releases_half_width():
    """L = 5: half-width (5 - 1)(1 + 1e-3)/2 = 2.002, no offset; the bounded value 2.002 tanh(z) crosses
    the rounding edge 1.5 (digit 3 -> 4, code 0.5 -> 1) at z = atanh(1.5 / 2.002). A half-width of
    (L - 1)(1 - 1e-3)/2 moves that edge by 0.0034."""
    import math

    fsq = FSQ(FSQConfig(levels=(5,)))
    edge = math.atanh(1.5 / 2.002)
    codes = fsq.quantize(torch.tensor([[edge - 2e-4], [edge + 2e-4]]))
    assert codes.flatten().tolist() == [0.5, 1.0]


def test_even_levels_are_shifted_without_a_clamp():
    """L = 2: h = 0.5005, offset 0.5, shift atanh(0.5 / 0.5005) = 3.80 (a cap of the ratio at 0.99 would
    make it 2.65). At z = -3: tanh(0.80) * 0.5005 - 0.5 = -0.167 rounds to 0 (code 0); with the cap,
    tanh(-0.35) * 0.5005 - 0.5 = -0.67 would round to -1."""
    import math

    fsq = FSQ(FSQConfig(levels=(2,)))
    expected = math.tanh(-3 + math.atanh(0.5 / 0.5005)) * 0.5005 - 0.5
    assert abs(fsq.bound(torch.tensor([[-3.0]])).item() - expected) < 1e-4  # float32 atanh near 1
    assert fsq.quantize(torch.tensor([[-3.0]])).item() == 0.0
