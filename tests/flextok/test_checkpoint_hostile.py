"""Broken and hostile checkpoints: a config outside bounds, of wrong types or not JSON, tensors of the
wrong shape, NaN weights -- each one CheckpointError line, before any module is built."""

from __future__ import annotations

import time

import pytest
import torch

from flextok import FlexTok
from flextok.checkpoint import CheckpointError, save_checkpoint
from flextok.config import FlexTokConfig
from flextok.generator import CHECKPOINT_KIND, Generator
from flextok.gpt import GPTConfig
from flextok.tokenizer import KIND


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FlexTok.from_preset("tiny")


def _save(tmp_path, tiny, config: dict, state=None, name="m.safetensors", config_json=None):
    path = tmp_path / name
    save_checkpoint(path, state if state is not None else tiny.state_dict(), kind=KIND, config=config)
    if config_json is not None:  # write raw metadata: save_checkpoint always writes valid JSON
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path),
                  metadata={"format": "flextok-at-scale", "format_version": "1", "kind": KIND, "config": config_json})
    return path


@pytest.mark.parametrize(("change", "message"), [
    ({"encoder_depth": 200_000}, "encoder_depth=200000 is outside 1..512"),
    ({"num_registers": 10**9}, "num_registers=1000000000 is outside"),
    ({"encoder_dim": "768"}, "encoder_dim must be an integer, got '768'"),
    ({"decoder_depth": 2.5}, "decoder_depth must be an integer"),
    ({"fsq": {"levels": [8, "x"]}}, "FSQConfig.levels must be"),
    ({"fsq": [8, 5]}, "fsq and .vae must be objects"),
    ({"cond_dropout_prob": float("nan")}, "cond_dropout_prob must be a finite number"),
    ({"no_such_field": 1}, "unknown FlexTokConfig fields"),
])
def test_bad_tokenizer_config_is_one_line_before_building(tmp_path, tiny, change, message):
    path = _save(tmp_path, tiny, {**tiny.config.to_dict(), **change})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as info:
        FlexTok.from_pretrained(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert time.perf_counter() - start < 30  # refused, not built (depth 200,000 took minutes and GBs)
    with pytest.raises(CheckpointError, match=message):
        FlexTok.config_of(path)


def test_config_that_is_not_a_json_object_is_one_line(tmp_path, tiny):
    for text, message in (("{not json", "not JSON"), ("[1, 2]", "not a JSON object")):
        path = _save(tmp_path, tiny, {}, config_json=text)
        with pytest.raises(CheckpointError, match=message):
            FlexTok.from_pretrained(path)


def test_tensor_shapes_must_match_the_config(tmp_path, tiny):
    state = dict(tiny.state_dict())
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    with pytest.raises(CheckpointError, match=f"wrong shape \\['{key}'\\]"):
        FlexTok.from_pretrained(_save(tmp_path, tiny, tiny.config.to_dict(), state=state))


def test_non_finite_weights_are_one_line(tmp_path, tiny):
    state = dict(tiny.state_dict())
    key = sorted(k for k in state if state[k].is_floating_point())[3]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    path = _save(tmp_path, tiny, tiny.config.to_dict(), state=state)
    with pytest.raises(CheckpointError, match=f"1 tensors hold NaN or infinite weights \\(first: {key}\\)"):
        FlexTok.from_pretrained(path)
    state[key].view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        FlexTok.from_pretrained(_save(tmp_path, tiny, tiny.config.to_dict(), state=state, name="inf.safetensors"))


def test_bad_generator_config_and_weights_are_one_line(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(codebook_size=1000, max_tokens=8, depth=1, dim=64, num_heads=2, cond="class", num_classes=3)
    gen = Generator(config)
    path = gen.save_pretrained(tmp_path / "g.safetensors")
    assert Generator.from_pretrained(path).config == config
    for change, message in (({"depth": 10**6}, "depth=1000000 is outside"),
                            ({"num_classes": 2**40}, "num_classes=1099511627776 is outside"),
                            ({"dim": None}, "dim must be an integer")):
        bad = save_checkpoint(tmp_path / "bad.safetensors", gen.state_dict(), kind=CHECKPOINT_KIND,
                              config={**config.to_dict(), **change})
        with pytest.raises(CheckpointError, match=message):
            Generator.from_pretrained(bad)
    state = {k: v.clone() for k, v in gen.state_dict().items()}
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    nan = save_checkpoint(tmp_path / "nan.safetensors", state, kind=CHECKPOINT_KIND, config=config.to_dict())
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        Generator.from_pretrained(nan)


def test_presets_stay_within_bounds():
    from flextok.config import TOKENIZER_PRESETS

    for name in TOKENIZER_PRESETS:
        assert isinstance(FlexTokConfig.from_dict(TOKENIZER_PRESETS[name].to_dict()), FlexTokConfig)
