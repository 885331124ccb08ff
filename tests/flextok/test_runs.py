"""`flextok.runs`: the newest model of a run folder (one answer for local, remote and training readers)
and whether a tokenizer speaks a checkpoint's tokens."""

import pytest
import torch

from flextok import FlexTok
from flextok.checkpoint import SAME_TOKENS_KEY
from flextok.runs import checkpoint_step, newest_local_model, newest_model, speaks_tokens_of


def test_checkpoint_steps_are_numbers_not_names():
    assert checkpoint_step("checkpoint_00000012") == 12 and checkpoint_step("checkpoint_7") == 7
    assert checkpoint_step("checkpoint_x") is None and checkpoint_step("model.safetensors") is None
    # by step, not by name: "checkpoint_10" sorts before "checkpoint_9" as text
    names = ["checkpoint_9", "checkpoint_10", "grids", "job.json"]
    have = {"checkpoint_9/model.safetensors", "checkpoint_10/model.safetensors"}
    assert newest_model(names, have.__contains__) == "checkpoint_10/model.safetensors"


def test_the_finished_model_wins_and_a_checkpoint_without_a_model_is_skipped(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint_{step:08d}").mkdir()
    for step in (2, 4):  # checkpoint 6 holds no model (still being written, or another kind of folder)
        (tmp_path / f"checkpoint_{step:08d}" / "model.safetensors").write_bytes(b"x")
    assert newest_local_model(tmp_path) == tmp_path / "checkpoint_00000004" / "model.safetensors"
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert newest_local_model(tmp_path) == tmp_path / "model.safetensors"
    assert newest_local_model(tmp_path / "nothing") is None


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    kw = dict(encoder_dim=32, decoder_dim=32, encoder_depth=1, decoder_depth=1, head_dim=16)
    base = FlexTok.from_preset("tiny", **kw).save_pretrained(root / "base.safetensors")
    other = FlexTok.from_preset("tiny", **kw).save_pretrained(root / "other.safetensors")
    base_sha = FlexTok.from_pretrained(base).checkpoint_sha256
    tuned = FlexTok.from_pretrained(base).save_pretrained(root / "tuned.safetensors",
                                                            extra={SAME_TOKENS_KEY: [base_sha]})
    return base, other, tuned, base_sha


def test_a_tokenizer_speaks_its_own_tokens_and_those_it_keeps(tokenizers):
    base, other, tuned, base_sha = tokenizers
    assert speaks_tokens_of(base, base_sha) and speaks_tokens_of(tuned, base_sha)  # a decoder-only fine-tune
    assert not speaks_tokens_of(other, base_sha)
    assert not speaks_tokens_of(base.parent / "missing.safetensors", base_sha) and not speaks_tokens_of(None, base_sha)
    assert not speaks_tokens_of(base, None)
