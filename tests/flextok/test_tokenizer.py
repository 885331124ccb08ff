"""FlexTok public API: tokenize/detokenize, checkpoints, presets on `meta`, the VAE path."""

import io
import json
import os
import pickle
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextok import CheckpointError, FlexTok, load_tokenizer
from flextok.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from flextok.config import TokenizerObjective

SMALL = dict(encoder_dim=64, decoder_dim=64, head_dim=32, encoder_depth=2, decoder_depth=2)
OFFICIAL = Path(__file__).resolve().parents[1] / "fixtures" / "flextok_official"  # copies of shared's manifests


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


def _images(n=3, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tokenize_shape_dtype_range(model):
    ids = model.tokenize(_images())
    assert ids.shape == (3, 32) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < model.config.codebook_size


def test_tokenize_rejects_wrong_image_shape(model):
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        model.tokenize(torch.zeros(1, 3, 64, 64))


def test_detokenize_takes_ragged_prefixes_in_one_call(model):
    ids = model.tokenize(_images())
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    ragged = model.detokenize([ids[0, :1], ids[1, :9], ids[2]], steps=3, generator=g())
    assert ragged.shape == (3, 3, 32, 32) and torch.isfinite(ragged).all()
    # Row i of the ragged call equals the same prefix decoded alone with the same noise.
    alone = model.detokenize(ids[1:2, :9], steps=3, generator=torch.Generator().manual_seed(7))
    noise_row1 = model.detokenize([ids[0, :1], ids[1, :9]], steps=3, generator=g())[1]
    assert torch.allclose(noise_row1, ragged[1], atol=1e-5)
    assert alone.shape == (1, 3, 32, 32)


def test_detokenize_rejects_empty_and_too_long(model):
    with pytest.raises(ValueError, match="1..32"):
        model.detokenize([torch.zeros(0, dtype=torch.long)])
    with pytest.raises(ValueError, match="1..32"):
        model.detokenize(torch.zeros(1, 33, dtype=torch.long))


def test_same_seed_same_image_other_seed_other_image(model):
    ids = model.tokenize(_images(2))
    a = model.detokenize(ids[:, :4], steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    b = model.detokenize(ids[:, :4], steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    c = model.detokenize(ids[:, :4], steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_changes_the_image_and_apg_runs(model):
    ids = model.tokenize(_images(2))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = model.detokenize(ids, steps=3, generator=g())
    guided = model.detokenize(ids, steps=3, guidance_scale=4.0, generator=g())
    apg = model.detokenize(ids, steps=3, guidance_scale=4.0, apg=True, generator=g())
    assert not torch.allclose(plain, guided) and not torch.allclose(guided, apg)


def test_training_forward_is_differentiable_and_seeded(model):
    x = _images(4)
    a = model(x, generator=torch.Generator().manual_seed(0))["loss"]
    b = model(x, generator=torch.Generator().manual_seed(0))["loss"]
    assert torch.equal(a, b) and a.requires_grad
    a.backward()
    assert model.encoder.to_codes.weight.grad.abs().sum() > 0  # gradient reaches the encoder via FSQ
    model.zero_grad()


@pytest.mark.parametrize("full", [0.0, 1.0])
def test_full_k_fraction_sends_a_gradient_to_the_last_token(model, full):
    """Under nested dropout the last of K registers is dropped for most samples (no gradient reaches
    its code); full_k_fraction = 1 keeps it for every sample."""
    captured = []

    def keep_codes(module, inputs, output):
        output[0].retain_grad()
        captured.append(output[0])

    trained = FlexTok.from_config(model.config)
    objective = TokenizerObjective(full_k_fraction=full, nested_dropout_mode="uniform",
                                   cond_dropout_prob=0.0)  # the null condition drops all
    trained.load_state_dict(model.state_dict())  # trained-like: a fresh decoder passes no gradient back yet
    handle = trained.fsq.register_forward_hook(keep_codes)
    try:
        trained(_images(8), generator=torch.Generator().manual_seed(0), objective=objective)["loss"].backward()
    finally:
        handle.remove()
    last = captured[0].grad[:, -1].abs().sum(dim=-1)  # (B,) gradient at the last register's code
    reached = int((last > 0).sum())
    assert reached == 8 if full == 1.0 else reached < 8, (reached, last)


@settings(max_examples=3, deadline=None)
@given(extra=st.integers(1, 3))
def test_a_grown_decoder_starts_as_exactly_the_checkpoint(model, extra):
    depth = model.config.decoder_depth
    grown = FlexTok.from_config(model.config.replace(decoder_depth=depth + extra))
    fresh = grown.load_with_fewer_decoder_blocks(model.state_dict())
    assert {name.split(".")[2] for name in fresh} == {str(i) for i in range(depth, depth + extra)}
    assert all(name.startswith("decoder.blocks.") for name in fresh)
    x = _images(4)
    tokens = model.tokenize(x)
    assert torch.equal(grown.tokenize(x), tokens)
    for k in (1, 32):
        a = model.detokenize(tokens[:, :k], steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(k))
        b = grown.detokenize(tokens[:, :k], steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(k))
        assert torch.equal(a, b)
    loss = grown(x, generator=torch.Generator().manual_seed(0))["loss"]
    assert torch.equal(loss, model(x, generator=torch.Generator().manual_seed(0))["loss"])
    loss.backward()  # the new blocks learn: their (zero) modulation gets a gradient
    assert grown.decoder.blocks[depth].adaLN_modulation[1].weight.grad.abs().sum() > 0


def test_growing_needs_fewer_blocks_and_the_same_widths(model):
    with pytest.raises(CheckpointError, match="growing needs fewer"):
        FlexTok.from_config(model.config).load_with_fewer_decoder_blocks(model.state_dict())
    wider = FlexTok.from_config(model.config.replace(decoder_depth=4, decoder_dim=96))
    with pytest.raises(CheckpointError, match="wrong shape"):
        wider.load_with_fewer_decoder_blocks(model.state_dict())


def test_checkpoint_round_trip_is_bit_exact(model, tmp_path):
    path = model.save_pretrained(tmp_path / "tok")
    assert path.name == "model.safetensors"
    loaded = FlexTok.from_pretrained(tmp_path / "tok")
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.checkpoint_sha256 == model.checkpoint_sha256 and len(loaded.checkpoint_sha256) == 64
    ids = model.tokenize(_images())
    assert torch.equal(loaded.tokenize(_images()), ids)
    meta = read_metadata(path)
    assert json.loads(meta["config"])["num_registers"] == 32 and meta["kind"] == "FlexTok"


def test_checkpoints_get_the_umask_mode_like_any_new_file(model, tmp_path):
    """safetensors alone creates 0600 files, which other users of a shared filesystem cannot read."""
    before = os.umask(0o027)
    try:
        path = model.save_pretrained(tmp_path / "tok.safetensors")
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640


def test_pickle_checkpoints_are_refused(model, tmp_path):
    torch_file = tmp_path / "model.pt"
    torch.save(model.state_dict(), torch_file)  # a zip of pickles
    with pytest.raises(CheckpointError, match="pickle"):
        FlexTok.from_pretrained(torch_file)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        FlexTok.from_pretrained(raw)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.pkl", b"x")
    (tmp_path / "z.safetensors").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError):
        FlexTok.from_pretrained(tmp_path / "z.safetensors")


@settings(max_examples=40, deadline=None)
@given(pad=st.integers(min_value=0, max_value=600))
def test_every_saved_checkpoint_loads_whatever_its_header_length(pad, tmp_path_factory):
    """A safetensors header length whose low byte is 0x80 (pickle's PROTO opcode) is still safetensors:
    one checkpoint in 256 used to be refused as a pickle. The padding walks the header length through
    more than two full cycles of its low byte, 0x80 included."""
    path = tmp_path_factory.mktemp("pad") / "w.safetensors"
    state = {"w": torch.arange(6, dtype=torch.float32).view(2, 3)}
    save_checkpoint(path, state, kind="Test", config={"pad": "x" * pad})
    loaded, metadata = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and json.loads(metadata["config"])["pad"] == "x" * pad


def test_a_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    path = tmp_path / "w.safetensors"
    state = {"w": torch.ones(2)}
    for pad in range(300):  # find the padding that puts 0x80 in the header length's first byte
        save_checkpoint(path, state, kind="Test", config={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(load_checkpoint(path)[0]["w"], state["w"])


def test_missing_and_mismatched_checkpoints_give_one_line_errors(model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "nope.safetensors")
    model.save_pretrained(tmp_path / "m.safetensors")
    from flextok.checkpoint import load_checkpoint, save_checkpoint

    state, meta = load_checkpoint(tmp_path / "m.safetensors")
    del state["decoder.mask_token"]
    save_checkpoint(tmp_path / "bad.safetensors", state, kind="FlexTok", config=json.loads(meta["config"]))
    with pytest.raises(CheckpointError, match="decoder.mask_token"):
        FlexTok.from_pretrained(tmp_path / "bad.safetensors")


def test_load_tokenizer_takes_preset_names():
    m = load_tokenizer("tiny")
    assert m.checkpoint_id == "preset:tiny" and m.checkpoint_sha256 is None


@pytest.mark.parametrize(
    "preset,manifest",
    [("d12_d12", "d12_d12_in1k"), ("d18_d18", "d18_d18_in1k"), ("d18_d28", "d18_d28_in1k")],
)
def test_paper_presets_on_meta_match_official_parameter_counts(preset, manifest):
    m = FlexTok.from_preset(preset, device="meta")
    total = sum(v.numel() for v in m.state_dict().values())
    no_vae = sum(v.numel() for k, v in m.state_dict().items() if not k.startswith("vae."))
    print(f"{preset}: {total:,} parameters ({no_vae:,} without the VAE)")
    expected = json.loads((OFFICIAL / f"flextok_{manifest}_keys.json").read_text())["state_dict"]
    assert total == sum(torch.Size(s).numel() for s in expected.values())
    # Independent of the manifests: the published sizes 0.3B / 0.9B / 3B (rounded, with the VAE).
    assert round(total / 1e9, 1 if total < 1e9 else 0) == {"d12_d12": 0.3, "d18_d18": 0.9, "d18_d28": 3}[preset]


def _tiny_vae_config(path=None):
    from flextok import VAEConfig

    return VAEConfig(latent_channels=4, downsample=2, block_out_channels=(32, 32), layers_per_block=1,
                     norm_num_groups=8, scaling_factor=0.5, path=path)


def _diffusers_vae():
    """diffusers' AutoencoderKL with `_tiny_vae_config`'s architecture, built directly."""
    import diffusers

    cfg = _tiny_vae_config()
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
    )


def test_latent_space_tokenizer_with_a_local_diffusers_vae(tmp_path):
    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    ref = _diffusers_vae()
    ref.save_pretrained(vae_dir, safe_serialization=True)
    m = FlexTok.from_preset("tiny", vae=_tiny_vae_config(str(vae_dir)), **SMALL)
    assert m.config.latent_size == 16 and m.config.latent_channels == 4
    assert torch.equal(m.vae.vae.encoder.conv_in.weight, ref.encoder.conv_in.weight)
    assert not any(p.requires_grad for p in m.vae.parameters())
    x = _images(2)
    ids = m.tokenize(x)
    assert ids.shape == (2, 32)
    out = m.detokenize(ids[:, :3], steps=2)
    assert out.shape == (2, 3, 32, 32)
    loss = m(x)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    # The VAE travels inside our checkpoint too.
    m.save_pretrained(tmp_path / "latent")
    again = FlexTok.from_pretrained(tmp_path / "latent")
    assert torch.equal(again.vae.vae.encoder.conv_in.weight, ref.encoder.conv_in.weight)


def test_training_noises_the_decoders_actual_input_as_the_flow_convention_says():
    """Inside FlexTok.forward, the decoder receives x_t = t * eps + (1 - t) * x0 and the loss is the MSE of
    its output against eps - x0. From the decoder's actual input (x_t, t) and x0 (the pixels: no VAE),
    eps = (x_t - (1 - t) x0) / t must be standard normal noise independent of x0, and the loss must equal
    mean((v - (x_t - x0) / t)^2). Swapping t and 1 - t in the noising, or the sign of the target, fails."""
    torch.manual_seed(0)
    model = FlexTok.from_preset("tiny", **SMALL)
    seen = {}

    def hook(module, args, output):
        seen["x_t"], seen["t"], seen["v"] = args[0].detach(), args[1].detach(), output.detach()

    x0 = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    handle = model.decoder.register_forward_hook(hook)
    try:
        loss = model(x0, generator=torch.Generator().manual_seed(2))["loss"].item()
    finally:
        handle.remove()
    t = seen["t"].view(-1, 1, 1, 1)
    assert seen["x_t"].shape == x0.shape and bool(((t > 0) & (t <= 1)).all())
    eps = (seen["x_t"] - (1 - t) * x0) / t
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02
    assert abs(torch.corrcoef(torch.stack([eps.flatten(), x0.flatten()]))[0, 1].item()) < 0.02
    expected = (seen["v"] - (seen["x_t"] - x0) / t).pow(2).mean().item()
    assert abs(loss - expected) <= 1e-5 * expected


def test_vae_matches_diffusers_autoencoderkl_called_directly(tmp_path):
    """Our VAE wrapper against diffusers' AutoencoderKL with the same weights, called directly: encode
    = posterior mean x scaling factor (not a sample), decode = decoder(latents / scaling), unclamped."""
    torch.manual_seed(0)
    ref = _diffusers_vae().eval()
    with torch.no_grad():  # non-trivial norms and a decoder whose output leaves [-1, 1]
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        ref.decoder.conv_out.weight.mul_(20)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    from flextok.vae import VAE

    ours = VAE(_tiny_vae_config(str(tmp_path / "vae")))
    ours.load_weights(str(tmp_path / "vae"))
    x = _images(2)
    with torch.no_grad():
        expected_latents = ref.encode(x).latent_dist.mean * 0.5
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        expected_images = ref.decode(z / 0.5).sample
    torch.testing.assert_close(ours.encode(x), expected_latents, atol=1e-6, rtol=0)
    assert expected_images.abs().max() > 1.5
    torch.testing.assert_close(ours.decode(z), expected_images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["shipped", "official"])
def test_encoder_only_load_reads_only_the_encoder_and_tokenizes_identically(which, monkeypatch):
    """An encoder-only load reads only the encoder's (and the VAE encoder's) tensors from the file,
    holds no decoder, and gives the full model's tokens; decoding it is a clear error."""
    import flextok
    import flextok.checkpoint as ckpt
    from flextok.tokenizer import is_encoder_key

    root = Path(__file__).resolve().parents[1]
    path = (Path(flextok.__file__).parent / "assets/fashion-mnist/tokenizer.safetensors" if which == "shipped"
            else root / "fixtures/official_golden/release")
    full = FlexTok.from_pretrained(path).eval()
    read: list[str] = []
    original = ckpt.safe_open

    class Spy:
        def __init__(self, *a, **kw):
            self.f = original(*a, **kw)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def metadata(self):
            return self.inner.metadata()

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

        def get_slice(self, name):  # shapes from the header; reads no data
            return self.inner.get_slice(name)

    monkeypatch.setattr(ckpt, "safe_open", Spy)
    enc = FlexTok.from_pretrained(path, encoder_only=True).eval()
    monkeypatch.undo()
    assert read and len(read) < len(full.state_dict())
    assert enc.decoder is None and not any(k.startswith("decoder.") for k in enc.state_dict())
    assert all(is_encoder_key(k) for k in enc.state_dict())
    assert sum(p.numel() for p in enc.parameters()) < sum(p.numel() for p in full.parameters())
    c = full.config
    x = torch.rand(4, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(enc.tokenize(x), full.tokenize(x))
    with pytest.raises(ValueError, match="encoder-only"):
        enc.detokenize(full.tokenize(x)[:, :2], steps=1)
