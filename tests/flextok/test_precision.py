"""Inference precision: the names, what each one runs, and fp32 kept where it matters."""

from pathlib import Path

import pytest
import torch
from torch import nn

import flextok
from flextok import FlexTok
from flextok.generator import Generator
from flextok.precision import PRECISIONS, compute_dtype, precision_context, resolve_precision

ASSETS = Path(flextok.__file__).parent / "assets"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_context_runs_matmuls_in_the_named_dtype(precision):
    layer = nn.Linear(4, 4)
    with precision_context(precision, "cpu"):
        out = layer(torch.randn(2, 4))
    assert out.dtype == compute_dtype(precision)
    assert out.dtype == {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                         "fp16": torch.float16}[precision]


def test_precision_names_are_checked_and_auto_follows_the_device():
    with pytest.raises(ValueError, match="precision must be one of"), precision_context("int8", "cpu"):
        pass
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp16", "cuda") == "fp16"


def test_kv_cache_is_kept_in_the_autocast_dtype():
    gpt = Generator.from_pretrained(ASSETS / "fashion-mnist/generator.safetensors").eval().gpt
    prefix = torch.randn(2, 1, gpt.config.dim)
    _, cache = gpt.prefill(prefix, num_tokens=4)
    assert cache.keys[0].dtype == torch.float32
    with precision_context("bf16", "cpu"):
        logits, cache = gpt.prefill(prefix, num_tokens=4)
        step = gpt.decode_step(logits.argmax(-1), cache)
    assert cache.keys[0].dtype == cache.values[-1].dtype == torch.bfloat16
    assert torch.isfinite(step.float()).all()


def test_training_flow_is_formed_in_fp32_under_autocast(monkeypatch):
    """x_t and t reach the decoder in fp32 with x_t = t * noise + (1 - t) * x0 exactly, even when the
    latents come out of an autocast region in bf16 (the VAE under bf16 autocast)."""
    model = FlexTok.from_preset("tiny", encoder_depth=1, decoder_depth=1, encoder_dim=32, decoder_dim=32)
    seen = {}
    original = model.decoder.forward

    def spy(x_t, t, registers):
        seen.update(x_t=x_t, t=t)
        return original(x_t, t, registers)

    monkeypatch.setattr(model.decoder, "forward", spy)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    bf16_latents = images.to(torch.bfloat16)  # what a VAE under bf16 autocast hands over
    monkeypatch.setattr(model, "images_to_latents", lambda x: bf16_latents)
    gen = torch.Generator().manual_seed(0)
    with precision_context("bf16", "cpu"):
        model(images, generator=gen)
    assert seen["x_t"].dtype == torch.float32 and seen["t"].dtype == torch.float32
    # Replay the draws of `forward` from the same seed: keep-k, drop, time, then noise.
    from flextok import flow
    from flextok.config import TokenizerObjective
    from flextok.nested_dropout import sample_keep_k

    c, o = model.config, TokenizerObjective()  # forward's default objective
    gen = torch.Generator().manual_seed(0)
    sample_keep_k(3, c.num_registers, o.nested_dropout_mode, full_fraction=o.full_k_fraction, generator=gen)
    torch.rand(3, generator=gen)
    t = flow.sample_time(3, mode=o.time_sampling, uniform_fraction=o.uniform_time_fraction,
                         noise_fraction=o.noise_time_fraction, generator=gen)
    noise = torch.randn(bf16_latents.shape, generator=gen)
    assert torch.equal(seen["t"], t)
    x0 = bf16_latents.float()
    torch.testing.assert_close(seen["x_t"], t.view(-1, 1, 1, 1) * noise + (1 - t.view(-1, 1, 1, 1)) * x0,
                               rtol=0, atol=1e-6)


def test_bf16_tokenization_changes_some_tokens_of_the_shipped_tokenizer(tmp_path):
    """The context is really applied: under bf16 autocast some tokens of the trained tokenizer move
    (the review measured ~2% on CPU), under fp32/tf32 none do."""
    from pipelines.corpus import build_corpus
    from pipelines.images import read_corpus

    build_corpus("fashion-mnist", tmp_path / "test", split="test", limit=64, samples_per_shard=64)
    tok = FlexTok.from_pretrained(ASSETS / "fashion-mnist/tokenizer.safetensors").eval()
    x = read_corpus(str(tmp_path / "test"), tok.config.image_size).images.float() / 127.5 - 1
    ref = tok.tokenize(x)
    with precision_context("fp32", "cpu"):
        assert torch.equal(tok.tokenize(x), ref)
    with precision_context("tf32", "cpu"):
        assert torch.equal(tok.tokenize(x), ref)
    with precision_context("bf16", "cpu"):
        bf16 = tok.tokenize(x)
    changed = (bf16 != ref).float().mean().item()
    assert 0 < changed < 0.2


def test_sampling_and_reconstruction_run_at_the_asked_precision(tmp_path):
    """`sample` and `reconstruction_metrics` apply `precision` (the trained models' outputs move under
    bf16) and hand back fp32 images."""
    from flextok.evaluation import reconstruction_metrics
    from flextok.sampling import sample

    tok = FlexTok.from_pretrained(ASSETS / "fashion-mnist/tokenizer.safetensors").eval()
    gen = Generator.from_pretrained(ASSETS / "fashion-mnist/generator.safetensors").eval()
    out = {}
    for precision in ("fp32", "bf16"):
        tokens, images = sample(gen, tok, [0, 5, 9], num_tokens=4, decoder_steps=2, precision=precision,
                                rng=torch.Generator().manual_seed(0))
        assert images.dtype == torch.float32
        out[precision] = images
    assert (out["fp32"] - out["bf16"]).abs().max() > 1e-3
    x = out["fp32"]
    psnr = {p: reconstruction_metrics(tok, x, [1, 4], steps=1, precision=p, grid_images=0).psnr for p in ("fp32", "bf16")}
    assert psnr["fp32"] != psnr["bf16"]


@pytest.mark.slow
def test_compiled_blocks_compute_what_eager_blocks_compute():
    """torch.compile of the blocks (split-attention encoder, adaLN decoder, KV-cached GPT) gives the
    eager results to fp32 tolerance; state-dict names are unchanged (no `_orig_mod.`)."""
    from flextok.compile import compile_available, compile_blocks
    from flextok.gpt import GPTConfig

    assert compile_available()  # CI machines have a C++ compiler: a broken compile must fail here
    torch.manual_seed(0)
    tok = FlexTok.from_preset("tiny", encoder_depth=1, decoder_depth=1, encoder_dim=32, decoder_dim=32).eval()
    with torch.no_grad():
        for block in tok.decoder.blocks:  # adaLN-zero would make the decoder blocks the identity
            block.adaLN_modulation[1].weight.normal_(0, 0.1)
    gen = Generator(GPTConfig.from_preset("tiny", depth=1, dim=64, num_heads=2)).eval()
    names = (list(tok.state_dict()), list(gen.state_dict()))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        codes, ids = tok.encode(x)
        regs = tok.decoder.embed_registers(codes, torch.tensor([3, 32]))
        eager = (tok.encoder(x), tok.decoder(x, t, regs),
                 gen.generate(torch.tensor([1, 2]), num_tokens=6, temperature=0))
        assert compile_blocks(tok) == 2 and compile_blocks(gen) == 1
        compiled = (tok.encoder(x), tok.decoder(x, t, regs),
                    gen.generate(torch.tensor([1, 2]), num_tokens=6, temperature=0))
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(compiled[2], eager[2])
    assert (list(tok.state_dict()), list(gen.state_dict())) == names
