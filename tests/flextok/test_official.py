"""Official FlexTok releases map onto this implementation key for key (shared/flextok-official)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flextok import CheckpointError, FlexTok, official

# copies of shared/flextok-official's manifests (key names and shapes of the four releases)
MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures" / "flextok_official"
NAMES = ["d12_d12_in1k", "d18_d18_in1k", "d18_d28_in1k", "d18_d28_dfn"]
PRESET = {"d12_d12_in1k": "d12_d12", "d18_d18_in1k": "d18_d18", "d18_d28_in1k": "d18_d28", "d18_d28_dfn": "d18_d28"}


def _manifest(name):
    return json.loads((MANIFESTS / f"flextok_{name}_keys.json").read_text())["state_dict"]


@pytest.mark.parametrize("name", NAMES)
def test_every_official_key_lands_on_exactly_one_entry_of_equal_shape(name):
    manifest = _manifest(name)
    state = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}
    config = official.infer_config(state)
    assert config == FlexTok.from_preset(PRESET[name], device="meta").config
    ours = FlexTok.from_config(config, device="meta").state_dict()
    targets = {}
    for key, shape in manifest.items():
        target = official.map_key(key)
        assert target in ours, f"{key} -> {target} has no counterpart"
        assert target not in targets, f"{key} and {targets.get(target)} both map to {target}"
        targets[target] = key
        assert tuple(shape) == official.expected_official_shape(target, config, ours[target].shape), key
    assert set(targets) == set(ours), f"never loaded: {sorted(set(ours) - set(targets))[:5]}"


def _fake_official(model: FlexTok) -> dict[str, torch.Tensor]:
    """Our weights written out under the official names and layouts (the inverse mapping)."""
    inverse = {}
    for key, value in model.state_dict().items():
        for old, new in official._RENAMES:
            if key.startswith(new):
                off = old + key[len(new):]
                break
        if key == "decoder.register_pos_emb":
            value = value.t().reshape(1, 1, *value.t().shape)
        inverse[off] = value.clone().contiguous()
    return inverse


def test_a_released_file_loads_strictly_and_reproduces_the_model(tmp_path):
    # The released preset sizes are far too big to allocate on CI; a scaled-down model written with
    # the official key names exercises the same recognition, inference and mapping code.
    src = FlexTok.from_preset("tiny", image_size=32, patch_size=2, encoder_dim=64, decoder_dim=64,
                              encoder_depth=2, decoder_depth=3, head_dim=64, fsq={"levels": (8, 8, 8, 5, 5, 5)})
    release = tmp_path / "flextok_release"
    release.mkdir()
    save_file(_fake_official(src), str(release / "model.safetensors"))
    loaded = FlexTok.from_pretrained(release)
    assert FlexTok.config_of(release) == loaded.config  # from the header's shapes alone
    assert loaded.config.decoder_depth == 3 and loaded.config.encoder_dim == 64
    assert loaded.config.patch_size == 2 and loaded.config.num_registers == 32
    a, b = src.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(src.tokenize(x), loaded.tokenize(x))


def test_an_official_file_with_a_foreign_key_is_an_error_that_names_it(tmp_path):
    src = FlexTok.from_preset("tiny", encoder_dim=64, decoder_dim=64, encoder_depth=1, decoder_depth=1,
                              head_dim=64, fsq={"levels": (8, 8, 8, 5, 5, 5)})
    state = _fake_official(src)
    state["decoder.module_dict.dec_repa_projector.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="dec_repa_projector"):
        FlexTok.from_pretrained(tmp_path)
