"""Packing variable-length sequences: the plan, the block-diagonal mask, and packed == padded losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flextok.config import TOKENIZER_PRESETS
from flextok.generator import IGNORE_INDEX, Generator, append_eos, pad_tokens
from flextok.gpt import GPTConfig
from flextok.packing import packed_attention_mask, plan_packing

TINY_TOK = TOKENIZER_PRESETS["tiny"]  # 1,000 codes, K = 32


def test_first_fit_decreasing_by_hand():
    plan = plan_packing([5, 3, 4, 2], row_length=8)
    # 5 -> row 0; 4 -> row 1; 3 -> row 0 after the 5; 2 -> row 1 after the 4
    assert (plan.row, plan.offset, plan.num_rows) == ([0, 0, 1, 1], [0, 5, 0, 4], 2)
    assert plan.padding_fraction == pytest.approx(1 - 14 / 16)
    assert plan.doc_ids().tolist() == [[0] * 5 + [1] * 3, [2] * 4 + [3] * 2 + [-1] * 2]
    assert plan.positions().tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]]
    with pytest.raises(ValueError, match="does not fit"):
        plan_packing([9], row_length=8)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), extra=st.integers(0, 30))
def test_every_sequence_gets_its_own_positions(lengths, extra):
    row_length = max(lengths) + extra
    plan = plan_packing(lengths, row_length)
    doc = plan.doc_ids()
    for i, n in enumerate(lengths):
        assert int((doc == i).sum()) == n  # placed whole, once, inside its row
        r, o = plan.row[i], plan.offset[i]
        assert doc[r, o : o + n].eq(i).all() and o + n <= row_length
    assert plan.num_rows * row_length - sum(lengths) == int((doc == -1).sum())


def test_mask_is_causal_within_a_document_and_blind_across():
    doc = torch.tensor([[0, 0, 1, 1, -1]])
    mask = packed_attention_mask(doc)[0, 0]
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, False, True, False, False],
        [False, False, True, True, False],
        [False, False, False, False, True],  # padding sees itself only: no empty softmax row
    ]


def _padded_per_sequence(model: Generator, rows, cond) -> torch.Tensor:
    """Reference: each sequence's mean loss through the padded teacher-forced forward."""
    prefix, prefix_mask = model.embed_condition(cond)
    targets = pad_tokens(rows, model.config.max_tokens)
    if model.config.use_eos:
        targets = append_eos(targets, model.config.eos_id, model.config.max_tokens)
    logits = model.gpt(prefix, targets[:, :-1].clamp(min=0), prefix_mask)  # (B, T, V)
    losses = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    return (losses * valid).sum(1) / valid.sum(1)


@pytest.mark.parametrize("use_eos", [False, True])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), row_extra=st.integers(0, 20))
def test_packed_loss_equals_padded_loss_per_sequence(use_eos, seed, row_extra):
    config = GPTConfig.for_tokenizer(TINY_TOK, depth=2, dim=64, num_heads=2, num_classes=4, use_eos=use_eos)
    torch.manual_seed(0)
    model = Generator(config).eval()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 33, (6,), generator=g).tolist()
    rows = [torch.randint(0, 1000, (n,), generator=g) for n in lengths]
    labels = torch.randint(0, 4, (6,), generator=g)
    with torch.no_grad():
        padded = model(rows, labels)
        packed = model.forward_packed(rows, labels, row_length=32 + row_extra)
        reference = _padded_per_sequence(model, rows, labels)
    assert packed.loss.item() == pytest.approx(padded.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(packed.per_sequence, reference, rtol=1e-5, atol=1e-6)
    assert packed.num_rows <= 6


def test_packed_text_loss_with_padded_captions_and_cfg_drop():
    from flextok.text_encoder import load_text_encoder

    encoder = load_text_encoder(max_length=8)
    config = GPTConfig.for_tokenizer(TINY_TOK, depth=1, dim=64, num_heads=2, cond="text", num_prefix_tokens=8,
                                     use_eos=True)
    torch.manual_seed(0)
    model = Generator(config, text_encoder=encoder).train()  # CFG drop on: the same draws from the same seed
    captions = ["red apple", "a black cat sleeping on a sofa in the sun", "snowflake", "fire"]
    rows = [torch.arange(n) for n in (3, 17, 1, 32)]
    padded = model(rows, captions, generator=torch.Generator().manual_seed(5))
    packed = model.forward_packed(rows, captions, generator=torch.Generator().manual_seed(5), row_length=64)
    assert packed.loss.item() == pytest.approx(padded.item(), rel=1e-5)
    padded.backward()  # and the gradients agree too
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    packed.loss.backward()
    for p, want in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-7)


def test_perturbing_one_sequence_leaves_the_others_unchanged():
    config = GPTConfig.for_tokenizer(TINY_TOK, depth=2, dim=64, num_heads=2, num_classes=4)
    torch.manual_seed(0)
    model = Generator(config).eval()
    rows = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 12, 5)]
    plan = plan_packing([n for n in (7, 3, 12, 5)], row_length=16)  # prefix + n - 1 positions each
    doc = plan.doc_ids()

    def states(seqs):
        prefix, _ = model.embed_condition(torch.tensor([0, 1, 2, 3]))
        emb = [torch.cat([prefix[i], model.gpt.tok_emb(s[:-1])]) for i, s in enumerate(seqs)]
        inputs = torch.nn.utils.rnn.pad_sequence(emb, batch_first=True)
        return model.gpt.features_packed(plan.pack(inputs, 0.0), plan.positions(), packed_attention_mask(doc))

    with torch.no_grad():
        before = states(rows)
        changed = list(rows)
        changed[2] = (rows[2] + 1) % 1000
        after = states(changed)
    others = (doc != 2) & (doc >= 0)
    assert torch.equal(before[others], after[others])
    assert not torch.allclose(before[doc == 2][1:], after[doc == 2][1:])  # the perturbation is real


def test_rotary_positions_restart_at_every_sequence(monkeypatch):
    """RoPE scores depend only on relative positions, so a loss cannot tell global positions from
    per-sequence ones; the rotary angles can. Each packed position must rotate by its index within
    its own sequence, counted here independently from the document ids alone."""
    import flextok.gpt

    seen = []
    original = flextok.gpt.rope_angles

    def spy(positions, head_dim, base):
        seen.append(positions.clone())
        return original(positions, head_dim, base)

    monkeypatch.setattr(flextok.gpt, "rope_angles", spy)
    config = GPTConfig.for_tokenizer(TINY_TOK, depth=1, dim=32, num_heads=2, num_classes=4, use_eos=True)
    model = Generator(config).eval()
    lengths = (7, 3, 12, 5, 1)
    rows = [torch.arange(n) for n in lengths]
    with torch.no_grad():
        model.forward_packed(rows, torch.arange(5) % 4, row_length=20)
    (positions,) = seen  # (R, S), handed to the rotary embedding once per forward
    plan = plan_packing([n + 1 for n in lengths], row_length=20)  # class prefix + n inputs/EOS each
    doc = plan.doc_ids()
    assert positions.shape == doc.shape
    for r in range(doc.shape[0]):
        for j in range(doc.shape[1]):
            if doc[r, j] >= 0:  # the index within its sequence: earlier positions of the same document
                assert positions[r, j] == int((doc[r, :j] == doc[r, j]).sum()), (r, j)
    assert int(positions.max()) == max(lengths)  # and not the row offset
