"""Parity with the official FlexTok code, stage by stage, against numbers the official code produced.

tests/fixtures/official_golden/ (a copy of shared/official-golden; its README gives every tensor and
setting) holds a tiny release in the official `save_pretrained` layout with seeded random weights
(d2-d2, width 128, K = 32, a small diffusers VAE), its inputs, and the official code's outputs. None of
the expected values comes from this project's code, so each test here fails if any convention of the
release (adaLN chunk order, time features, LayerNorm eps, FSQ bound, APG on velocities, unclamped VAE
decode) is computed differently. Tolerances are the fixture's: ids, codes and the FSQ probe exact;
latents, encoder outputs and velocities to 1e-5; detokenized latents and images to 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flextok import FlexTok
from flextok.tokenizer import OFFICIAL_DETOKENIZE

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "official_golden"
SETTINGS = json.loads((GOLDEN / "expected.json").read_text())["settings"]


@pytest.fixture(scope="module")
def release():
    return FlexTok.from_pretrained(GOLDEN / "release").eval()


@pytest.fixture(scope="module")
def inputs():
    return load_file(str(GOLDEN / "inputs.safetensors"))


@pytest.fixture(scope="module")
def expected():
    return load_file(str(GOLDEN / "expected.safetensors"))


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert actual.shape == expected.shape
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= atol, f"max |ours - official| = {err:.3g} > {atol}"


def test_the_release_loads_with_the_architecture_of_its_config(release):
    c = release.config
    assert (c.encoder_dim, c.encoder_depth, c.decoder_dim, c.decoder_depth) == (128, 2, 128, 2)
    assert (c.num_registers, c.patch_size, c.image_size, c.fsq.levels) == (32, 2, 256, (8, 8, 8, 5, 5, 5))
    # the VAE is smaller than the release's c16 one: channels and blocks come from the tensor shapes
    assert c.vae.block_out_channels == (32, 64, 64, 64) and c.vae.layers_per_block == 2
    assert (c.vae.latent_channels, c.vae.scaling_factor, c.vae.norm_num_groups) == (16, 0.88, 32)
    assert release.detokenize_defaults == OFFICIAL_DETOKENIZE  # 20 steps, guidance 7.5, APG


@pytest.mark.slow
def test_vae_latents_are_the_posterior_mean(release, inputs, expected):
    with torch.no_grad():
        _close(release.images_to_latents(inputs["images"]), expected["vae_latents"], 1e-5)


def test_encoder_outputs_and_token_ids(release, expected):
    with torch.no_grad():
        z = release.encoder(expected["vae_latents"])
    _close(z, expected["enc_z"], 1e-5)
    codes, ids = release.fsq(expected["enc_z"])
    assert torch.equal(codes, expected["fsq_codes"])
    assert torch.equal(ids, expected["token_ids"])


@pytest.mark.slow
def test_tokenize_end_to_end_gives_the_official_ids(release, inputs, expected):
    assert torch.equal(release.tokenize(inputs["images"]), expected["token_ids"])


def test_fsq_probe_matches_exactly(release, expected):
    """16,193 values across every rounding boundary: a bound eps of the wrong sign moves 157 ids."""
    codes, ids = release.fsq(expected["fsq_probe_z"])
    assert torch.equal(codes, expected["fsq_probe_codes"])
    assert torch.equal(ids, expected["fsq_probe_ids"])
    assert torch.equal(release.fsq.tokens_to_codes(expected["fsq_probe_ids"]), expected["fsq_probe_codes"])


@pytest.mark.parametrize("k", SETTINGS["velocity"]["k"])
@pytest.mark.parametrize("null", [False, True], ids=["cond", "null"])
def test_decoder_velocity(release, inputs, expected, k, null):
    t = SETTINGS["velocity"]["t"]
    x_t = t * inputs["velocity_noise"] + (1 - t) * expected["vae_latents"]
    _close(x_t, expected["velocity_x_t"], 0.0)  # the fixture's flow convention is ours
    codes = release.fsq.tokens_to_codes(expected["token_ids"])
    keep = torch.full((2,), k)
    drop = torch.ones(2, dtype=torch.bool) if null else None
    with torch.no_grad():
        v = release.decoder(x_t, torch.full((2,), t), release.decoder.embed_registers(codes, keep, drop))
    _close(v, expected[f"velocity_k{k}_{'null' if null else 'cond'}"], 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cfg", "apg"])
def test_detokenize_latents_and_unclamped_images(release, expected, mode):
    detok = SETTINGS["detokenize"]
    ids = [expected["token_ids"][i, :n] for i, n in enumerate(detok["token_lengths"])]
    kwargs = dict(steps=detok["steps"], guidance_scale=detok["guidance_scale"], apg=mode == "apg")
    noise_seed = torch.Generator().manual_seed(123)
    assert torch.equal(torch.randn(2, 16, 32, 32, generator=noise_seed), expected["detok_noise"])
    latents = release.detokenize_latents(ids, generator=torch.Generator().manual_seed(123), **kwargs)
    _close(latents, expected[f"detok_{mode}_latents"], 1e-4)
    images = release.latents_to_images(latents)  # what detokenize returns
    assert images.abs().max() > 1  # the fixture's images leave [-1, 1]: nothing clamps them
    _close(images, expected[f"detok_{mode}_images"], 1e-4)


def _release_with(tmp_path, edit):
    """The golden release with its config.json edited by `edit(config)` (weights linked, not copied)."""
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(GOLDEN / "release" / "model.safetensors")
    config = json.loads((GOLDEN / "release" / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_release_config_settings_are_honoured(tmp_path):
    def edit(config):
        config["decoder"]["module_dict"]["dec_time_embedder"]["max_timestep"] = 1000.0
        config["regularizer"]["levels"] = [8, 8, 8, 6, 5, 4]
        config["vae"]["scaling_factor"] = 0.5

    c = FlexTok.config_of(_release_with(tmp_path, edit))
    assert (c.max_timestep, c.fsq.levels, c.vae.scaling_factor) == (1000.0, (8, 8, 8, 6, 5, 4), 0.5)
    assert FlexTok.config_of(GOLDEN / "release").max_timestep == 1.0


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["decoder"]["module_dict"]["dec_to_patches"].update(use_mup_readout=True), "use_mup_readout"),
    (lambda c: c["encoder"]["module_dict"]["enc_seq_packer"].update(mask_mode="causal"), "mask_mode"),
    (lambda c: c["decoder"]["module_dict"]["dec_registers_posemb_module"].update(posemb_type="learnable_prod"),
     "posemb_type"),
    (lambda c: c["decoder"]["module_dict"].update(dec_extra={"_target_": "x.Y"}), "dec_extra"),
    (lambda c: c["decoder"].update(module_dict=dict(reversed(list(c["decoder"]["module_dict"].items())))), "order"),
    (lambda c: c["decoder"]["module_dict"]["dec_transformer"].update(depth=3), "depth = 3"),
])
def test_release_config_settings_computed_differently_here_are_refused(tmp_path, edit, message):
    from flextok import CheckpointError

    with pytest.raises(CheckpointError, match=message):
        FlexTok.config_of(_release_with(tmp_path, edit))
