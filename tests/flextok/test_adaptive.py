"""Adaptive length (`FlexTok.tokenize_adaptive`): the batched one-step search against a reference that
decodes every prefix on its own through the public `detokenize_latents`."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flextok
from flextok import FlexTok
from flextok.adaptive import LengthTarget

ASSETS = Path(flextok.__file__).parent / "assets"


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


def _images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _alone_mse(model, images, tokens, k, seed=0):
    """Latent MSE of one image's k-token prefix, decoded alone with one Euler step."""
    latents = model.detokenize_latents(tokens[None, :k], steps=1, generator=torch.Generator().manual_seed(seed))
    return (latents[0] - images).pow(2).mean().item()


def test_target_validation():
    with pytest.raises(ValueError, match="exactly one"):
        LengthTarget()
    with pytest.raises(ValueError, match="exactly one"):
        LengthTarget(max_relative_error=0.1, max_error=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        LengthTarget(max_error=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        LengthTarget(max_error=float("nan"))
    with pytest.raises(ValueError, match="ascending"):
        LengthTarget(max_error=0.1, candidates=(4, 2))
    with pytest.raises(ValueError, match="pow2"):
        LengthTarget(max_error=0.1, candidates="pow3")
    with pytest.raises(ValueError, match="exceeds"):
        LengthTarget(max_error=0.1, candidates=(2, 40)).lengths(32)


def test_candidate_lengths_always_end_in_k():
    assert LengthTarget(max_error=0.1).lengths(5) == (1, 2, 3, 4, 5)
    assert LengthTarget(max_error=0.1, candidates="pow2").lengths(32) == (1, 2, 4, 8, 16, 32)
    assert LengthTarget(max_error=0.1, candidates="pow2").lengths(12) == (1, 2, 4, 8, 12)
    assert LengthTarget(max_error=0.1, candidates=(3, 7)).lengths(12) == (3, 7, 12)


def test_every_candidate_error_equals_its_prefix_decoded_alone(model):
    images = _images(3)
    found = model.tokenize_adaptive(images, LengthTarget(max_relative_error=0.1, candidates=(1, 3, 8, 20)))
    assert found.candidate_lengths.tolist() == [1, 3, 8, 20, 32]
    assert torch.equal(found.tokens, model.tokenize(images))
    for b in range(3):
        for j, k in enumerate(found.candidate_lengths.tolist()):
            alone = _alone_mse(model, images[b], found.tokens[b], k)
            assert found.candidate_mse[b, j].item() == pytest.approx(alone, rel=1e-4)
    assert torch.equal(found.full_mse, found.candidate_mse[:, -1])


@settings(max_examples=10, deadline=None)
@given(relative=st.floats(0.0, 3.0), seed=st.integers(0, 3))
def test_relative_target_picks_the_shortest_candidate_within_bound(model, relative, seed):
    images = _images(3, seed)
    found = model.tokenize_adaptive(images, LengthTarget(max_relative_error=relative, candidates=(1, 2, 3, 5, 9, 17)))
    mse, lengths = found.candidate_mse, found.candidate_lengths
    assert found.meets_target.all()  # all K always qualifies under a relative target
    for b in range(3):
        bound = (1 + relative) * mse[b, -1]
        expected = next(int(k) for k, e in zip(lengths, mse[b]) if e <= bound)  # reference: a plain scan
        assert found.num_tokens[b].item() == expected
        assert found.mse[b] <= bound
    assert [len(p) for p in found.prefixes()] == found.num_tokens.tolist()


def test_absolute_target_missed_keeps_all_tokens(model):
    images = _images(3)
    never = model.tokenize_adaptive(images, LengthTarget(max_error=0.0))
    assert never.num_tokens.tolist() == [32, 32, 32] and not never.meets_target.any()
    always = model.tokenize_adaptive(images, LengthTarget(max_error=1e9, candidates=(2, 5)))
    assert always.num_tokens.tolist() == [2, 2, 2] and always.meets_target.all()


def test_measurement_noise_is_the_seeded_one(model):
    images = _images(2)
    a = model.tokenize_adaptive(images, LengthTarget(max_error=1.0, candidates=(5,), noise_seed=0)).candidate_mse
    b = model.tokenize_adaptive(images, LengthTarget(max_error=1.0, candidates=(5,), noise_seed=5)).candidate_mse
    assert not torch.allclose(a, b)  # the seed reaches the noise, and seed 0 is the one a batch of one draws
    assert a[1, 0].item() == pytest.approx(_alone_mse(model, images[1], model.tokenize(images)[1], 5, seed=0), rel=1e-4)


def test_detokenize_reads_negative_ids_as_padding(model):
    ids = model.tokenize(_images(2))
    padded = ids[:, :6].clone()
    padded[0, 3:] = -1
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    got = model.detokenize(padded, steps=2, generator=g())
    want = model.detokenize([ids[0, :3], ids[1, :6]], steps=2, generator=g())
    assert torch.equal(got, want)
    padded[1, 2] = -1  # padding before a token
    with pytest.raises(ValueError, match="padding"):
        model.detokenize(padded)


@pytest.mark.slow
def test_shipped_fashion_mnist_tokenizer_adapts_and_every_row_meets_its_target(tmp_path):
    """The issue's check on real held-out images: fewer tokens than K on average, and each chosen
    prefix, decoded on its own (batch of one, the measurement's noise seed), meets the target."""
    from pipelines.corpus import build_corpus
    from pipelines.images import read_corpus

    build_corpus("fashion-mnist", tmp_path / "test", split="test", limit=24, samples_per_shard=24)
    tokenizer = FlexTok.from_pretrained(ASSETS / "fashion-mnist/tokenizer.safetensors").eval()
    images = read_corpus(str(tmp_path / "test"), tokenizer.config.image_size).images.float() / 127.5 - 1
    relative = 0.2
    found = tokenizer.tokenize_adaptive(images, LengthTarget(max_relative_error=relative))
    assert found.num_tokens.float().mean() < 0.75 * 32, found.num_tokens
    for b in range(len(images)):
        k = int(found.num_tokens[b])
        chosen, full = _alone_mse(tokenizer, images[b], found.tokens[b], k), _alone_mse(tokenizer, images[b], found.tokens[b], 32)
        assert chosen <= (1 + relative) * full * (1 + 1e-5), (b, k, chosen, full)
        if k > 1:  # and the next shorter prefix would not have met it
            shorter = _alone_mse(tokenizer, images[b], found.tokens[b], k - 1)
            assert shorter > (1 + relative) * full * (1 - 1e-5), (b, k, shorter, full)
