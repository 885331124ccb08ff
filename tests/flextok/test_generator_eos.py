"""Generators that stop: the end-of-sequence id, its loss, and batched KV-cached sampling that ends
each row at its EOS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flextok.config import TOKENIZER_PRESETS
from flextok.generator import IGNORE_INDEX, PAD_ID, Generator, append_eos, token_lengths
from flextok.gpt import GPTConfig
from flextok.text_encoder import load_text_encoder

TINY_TOK = TOKENIZER_PRESETS["tiny"]  # 1,000 codes, K = 32
EOS_CONFIG = GPTConfig.for_tokenizer(TINY_TOK, depth=2, dim=64, num_heads=2, num_classes=4, use_eos=True)
LENGTHS = [3, 7, 12, 32]  # one training sequence per class; the last one runs to the cap


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ragged() -> list[torch.Tensor]:
    g = seeded(0)
    return [torch.randint(0, 1000, (n,), generator=g) for n in LENGTHS]


@pytest.fixture(scope="module")
def trained(ragged) -> Generator:
    """An EOS generator that memorised one variable-length sequence per class."""
    torch.manual_seed(0)
    model = Generator(EOS_CONFIG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = seeded(0)
    for _ in range(150):
        loss = model(ragged + ragged, torch.arange(4).repeat(2), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2, f"did not memorise, loss {loss.item()}"
    return model.eval()


def test_vocabulary_grows_by_one_outside_the_codebook():
    assert EOS_CONFIG.vocab_size == 1001 and EOS_CONFIG.eos_id == 1000
    fixed = EOS_CONFIG.replace(use_eos=False)
    assert fixed.vocab_size == 1000 and fixed.eos_id is None
    model = Generator(EOS_CONFIG)
    assert model.gpt.head.out_features == 1001 and model.gpt.tok_emb.num_embeddings == 1001
    # a config written before the field existed loads as a fixed-length generator
    data = fixed.to_dict()
    del data["use_eos"]
    assert GPTConfig.from_dict(data) == fixed
    with pytest.raises(ValueError, match="use_eos"):
        GPTConfig.from_dict({**data, "use_eos": "yes"})


def test_append_eos_by_hand():
    X = IGNORE_INDEX
    targets = torch.tensor([[1, 2, X], [3, X, X], [4, 5, 6]])
    assert append_eos(targets, 9, max_tokens=5).tolist() == [[1, 2, 9, X], [3, 9, X, X], [4, 5, 6, 9]]
    # at K = 3 the full row ends at the cap: no EOS, and the width stays K
    assert append_eos(targets, 9, max_tokens=3).tolist() == [[1, 2, 9], [3, 9, X], [4, 5, 6]]


def test_eos_loss_is_cross_entropy_over_tokens_and_their_eos():
    torch.manual_seed(0)
    model = Generator(EOS_CONFIG).eval()
    rows = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    loss = model(rows, [1, 2])
    prefix, _ = model.embed_condition([1, 2])
    # reference: the full teacher-forced logits, targets written out by hand
    inputs = torch.tensor([[5, 6, 7], [8, 0, 0]])
    logits = model.gpt(prefix, inputs)  # (2, 4, V)
    picks = [(0, 0, 5), (0, 1, 6), (0, 2, 7), (0, 3, 1000), (1, 0, 8), (1, 1, 1000)]
    want = torch.stack([-F.log_softmax(logits[b, j], -1)[t] for b, j, t in picks]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_rows_stop_at_their_eos(trained, ragged):
    out = trained.generate(torch.arange(4), temperature=0)
    assert out.shape == (4, 32)
    assert token_lengths(out).tolist() == LENGTHS
    for row, seq in zip(out, ragged):
        assert torch.equal(row[: len(seq)], seq) and bool((row[len(seq):] == PAD_ID).all())
    # --num-tokens is a cap: a row stops at its EOS or at the cap, whichever comes first
    capped = trained.generate(torch.arange(4), temperature=0, num_tokens=8)
    assert token_lengths(capped).tolist() == [3, 7, 8, 8]


@pytest.mark.parametrize("cfg_scale", [None, 2.5])
def test_batched_generation_equals_one_row_at_a_time(trained, cfg_scale):
    labels = [0, 1, 2, 3, 1, 0]
    kwargs = {"temperature": 1.5, "top_k": 50, "cfg_scale": cfg_scale}  # random enough to vary lengths
    batched = trained.generate(labels, generator=[seeded(s) for s in range(6)], **kwargs)
    alone = torch.cat([trained.generate([c], generator=[seeded(s)], **kwargs) for s, c in enumerate(labels)])
    assert torch.equal(batched, alone)
    assert len(set(token_lengths(batched).tolist())) > 1  # rows really ended at different steps
    recomputed = trained.generate(labels, generator=[seeded(s) for s in range(6)], use_kv_cache=False, **kwargs)
    assert torch.equal(batched, recomputed)


def test_finished_rows_leave_the_batch(trained):
    sizes = []
    step = trained.gpt.decode_step

    def spy(tokens, cache):
        sizes.append(tokens.shape[0])
        return step(tokens, cache)

    trained.gpt.decode_step = spy
    try:
        trained.generate(torch.arange(4), temperature=0, cfg_scale=2.0)
    finally:
        del trained.gpt.decode_step
    # cond + uncond rows: 4 sequences until the first ends after 3 tokens, ..., the last alone
    assert sizes[0] == 8 and sizes[3] == 6 and sizes[7] == 4 and sizes[12] == 2 and sizes[-1] == 2
    assert len(sizes) == 31


def test_text_generator_with_eos_runs_with_cfg():
    encoder = load_text_encoder(max_length=8)
    config = GPTConfig.for_tokenizer(TINY_TOK, depth=1, dim=64, num_heads=2, cond="text", num_prefix_tokens=8,
                                     use_eos=True)
    torch.manual_seed(0)
    model = Generator(config, text_encoder=encoder).eval()
    with torch.no_grad():
        model.gpt.head.weight[1000] += 0.5 * model.gpt.tok_emb.weight.std()  # EOS now and then
    captions = ["red apple", "a black cat sleeping", "snowflake"]
    batched = model.generate(captions, cfg_scale=3.0, generator=[seeded(s) for s in range(3)])
    alone = torch.cat([model.generate([c], cfg_scale=3.0, generator=[seeded(s)]) for s, c in enumerate(captions)])
    assert torch.equal(batched, alone)
