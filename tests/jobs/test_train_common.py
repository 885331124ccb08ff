"""The shared training machinery without Ray: schedule, optimizer state, EMA, checkpoints, collates."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextok.checkpoint import read_metadata
from flextok.config import TokenizerObjective, get_preset
from pipelines.writer import OutputStore
from training.data import IGNORE_INDEX, PixelCollate, TokenCollate, pad_token_lists
from training.driver import summary_line
from training.optim import EMA, build_optimizer, load_optimizer_tensors, lr_at, optimizer_tensors
from training.runs import MODEL_FILE, STATE_FILE, check_job_settings, latest_model_file
from training.settings import TrainConfig
from training.tasks import TokenizerTask
from training.trainer import Trainer

TINY = get_preset("tiny").replace(encoder_dim=32, decoder_dim=32, encoder_depth=1, decoder_depth=1, head_dim=16)


def images_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)}


# Settings and schedule ----------------------------------------------------------------------------
def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the cosine
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert lr_at(0, cfg.replace(warmup_steps=0)) == pytest.approx(1e-3)


@given(max_steps=st.integers(2, 400), warmup=st.integers(0, 1000))
def test_every_run_reaches_its_peak_rate(max_steps, warmup):
    """However long the warm-up asked for, a run of any length trains at the peak lr at some step."""
    cfg = TrainConfig(max_steps=max_steps, warmup_steps=warmup, lr=1e-3)
    lrs = [lr_at(s, cfg) for s in range(max_steps)]
    assert max(lrs) == pytest.approx(1e-3) and all(0 < x <= 1e-3 * (1 + 1e-9) for x in lrs)


@pytest.mark.parametrize(
    "changes, message",
    [({"batch_size": 10, "num_workers": 3}, "split evenly"), ({"max_steps": 0}, "max_steps"),
     ({"lr": 0.0}, "lr > 0"), ({"ema_decay": 1.0}, "ema_decay"), ({"grid_every": -1}, "grid_every")],
)
def test_train_config_rejects_bad_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_weight_decay_applies_to_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt, names = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]


def test_optimizer_state_round_trips_through_flat_named_tensors():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt, names = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    flat = optimizer_tensors(opt, names)
    assert set(flat) == {f"{n}.{k}" for n in names for k in ("step", "exp_avg", "exp_avg_sq")}
    other = torch.nn.Linear(3, 2)
    opt2, _ = build_optimizer(other, TrainConfig(), torch.device("cpu"))
    load_optimizer_tensors(opt2, names, flat)
    for key, value in optimizer_tensors(opt2, names).items():
        assert torch.equal(value, flat[key]), key
    with pytest.raises(ValueError, match="unknown parameter"):
        load_optimizer_tensors(opt2, names, {"nope.weight.exp_avg": torch.zeros(1)})


def test_ema_follows_the_weights_with_a_ramped_decay():
    online, shadow = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
    ema = EMA(online, shadow, decay=0.99)
    start = shadow.weight.detach().clone()
    assert torch.equal(start, online.weight)  # starts as a copy
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(step=0)  # decay min(0.99, 1/10) = 0.1: moves 90% of the way
    assert torch.allclose(shadow.weight, start + 0.9)
    ema.update(step=10_000)  # decay 0.99
    assert torch.allclose(shadow.weight, start + 0.9 + 0.1 * 0.01)
    assert not shadow.weight.requires_grad


# One worker's training state ----------------------------------------------------------------------
def test_trainer_resumes_bit_identically_from_its_safetensors_checkpoint(tmp_path):
    task = TokenizerTask(config=TINY, preset="tiny")
    cfg = TrainConfig(max_steps=10, warmup_steps=2, batch_size=4)
    batch = task.prepare_batch(images_batch(), torch.device("cpu"))
    a = Trainer(task, cfg, torch.device("cpu"))
    for _ in range(3):
        a.train_step(batch)
    a.items_seen, a.last_loss = 12, 1.25
    a.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE, STATE_FILE]
    for name in (MODEL_FILE, STATE_FILE):  # safetensors, never a pickle/zip
        assert (tmp_path / name).read_bytes()[8:9] == b"{"
    state_md = read_metadata(tmp_path / STATE_FILE)
    assert state_md["kind"] == "TrainState" and json.loads(state_md["train_state"])["step"] == 3
    assert read_metadata(tmp_path / MODEL_FILE)["step"] == "3"  # the EMA model in the model's own format

    b = Trainer(task, cfg, torch.device("cpu"))
    with torch.no_grad():  # other weights: everything must come from the checkpoint
        for p in list(b.model.parameters()) + list(b.ema.model.parameters()):
            p.add_(1.0)
    state = b.load(tmp_path)
    assert (b.step, b.items_seen, state["loss"]) == (3, 12, 1.25)
    a.reseed(0)
    b.reseed(0)
    loss_a, loss_b = a.train_step(batch)[0], b.train_step(batch)[0]
    assert loss_a.item() == loss_b.item()
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(a.ema.model.parameters(), b.ema.model.parameters()):
        assert torch.equal(p, q)


def test_only_the_main_worker_keeps_an_ema():
    task = TokenizerTask(config=TINY, preset="tiny")
    trainer = Trainer(task, TrainConfig(), torch.device("cpu"), is_main=False)
    assert trainer.ema is None
    with pytest.raises(AssertionError, match="main worker"):
        trainer.save(Path("/nonexistent"))


# Collates -----------------------------------------------------------------------------------------
token_rows = st.lists(st.one_of(st.none(), st.lists(st.integers(0, 2**16 - 1), max_size=40)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(rows=token_rows, split=st.integers(0, 30), offset=st.integers(0, 5))
def test_padding_keeps_every_token_and_every_length(rows, split, offset):
    """Chunked, sliced, with null rows: row i of the result is row i's tokens, then padding."""
    array = pa.array([[0] * 3] * offset + rows, pa.list_(pa.uint16())).slice(offset)
    split = min(split, len(rows))
    column = pa.chunked_array([array.slice(0, split), array.slice(split)], pa.list_(pa.uint16()))
    tokens, lengths = pad_token_lists(column)
    expected = [r or [] for r in rows]
    assert tokens.dtype == np.int64 and lengths.tolist() == [len(r) for r in expected]
    assert tokens.shape == (len(rows), max((len(r) for r in expected), default=0))
    for i, row in enumerate(expected):
        assert tokens[i, : len(row)].tolist() == row
        assert (tokens[i, len(row) :] == IGNORE_INDEX).all()


def test_token_collate_gives_padded_tokens_labels_and_captions():
    table = pa.table({
        "tokens": pa.array([[5, 6, 7], [8]], pa.list_(pa.uint16())),
        "label": pa.array([3, 1], pa.int32()),
        "caption": pa.array(["a shoe", "a bag"]),
    })
    out = TokenCollate(labels=True, captions=True)(table)
    assert out["tokens"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["lengths"].tolist() == [3, 1] and out["label"].tolist() == [3, 1]
    assert out["caption"] == ["a shoe", "a bag"]
    assert set(TokenCollate()(table)) == {"tokens", "lengths"}


def test_pixel_collate_turns_rgb_bytes_into_uint8_images():
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    table = pa.table({"pixels": pa.array([p.tobytes() for p in pixels], pa.binary())})
    out = PixelCollate(4)(table)["pixels"]
    assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(pixels))
    images = TokenizerTask(config=TINY, preset="tiny").prepare_batch({"pixels": out}, torch.device("cpu"))
    assert images.shape == (2, 3, 4, 4) and images.min() >= -1 and images.max() <= 1
    assert images[0, 0, 0, 0].item() == pytest.approx(-1.0)  # pixel value 0


# Run folder ---------------------------------------------------------------------------------------
def test_a_rerun_with_other_settings_is_refused_with_the_first_difference(tmp_path):
    store = OutputStore(str(tmp_path))
    settings = {"job": "train-tokenizer", "model": {"config": {"fsq": {"levels": (8, 5)}, "dim": 32}}, "train": {"lr": 1e-3}}
    check_job_settings(store, settings)  # nothing recorded yet
    store.write_json("job.json", {**settings, "resources": {"num_workers": 2}})
    check_job_settings(store, settings)  # tuples vs JSON lists, other resources: the same run
    with pytest.raises(ValueError, match=r"model\.config\.dim=32, not 64"):
        check_job_settings(store, {**settings, "model": {"config": {"fsq": {"levels": (8, 5)}, "dim": 64}}})
    with pytest.raises(ValueError, match=r"train\.lr"):
        check_job_settings(store, {**settings, "train": {"lr": 2e-3}})
    # a config field added since the run started (so not in its job.json) does not stop it resuming...
    grown = {**settings, "model": {"config": {"fsq": {"levels": (8, 5)}, "dim": 32, "full_k_fraction": 0.0}}}
    check_job_settings(store, grown)
    # ...but a recorded field that is gone is still a difference
    with pytest.raises(ValueError, match=r"model\.config\.dim=32, not None"):
        check_job_settings(store, {**settings, "model": {"config": {"fsq": {"levels": (8, 5)}}}})


def test_a_tokenizer_run_from_before_the_numerical_conventions_is_not_resumed_under_new_ones(tmp_path):
    """Its job.json has no norm_eps: it trained with LayerNorm eps 1e-6, time period 10^4, FSQ bound -1e-3
    and DiT's adaLN order; the same flags today build the official conventions, another model."""
    store = OutputStore(str(tmp_path))
    old = {k: v for k, v in TINY.to_dict().items() if k not in ("norm_eps", "time_max_period", "max_timestep")}
    old["fsq"] = {"levels": list(TINY.fsq.levels)}
    store.write_json("job.json", {"job": "train-tokenizer", "model": {"kind": "FlexTok", "config": old}})
    now = {"job": "train-tokenizer", "model": {"kind": "FlexTok", "config": TINY.to_dict(),
                                               "objective": TokenizerObjective().to_dict()}}
    with pytest.raises(ValueError, match=r"model\.config\.fsq\.bound_eps=-0\.001, not 0\.001"):
        check_job_settings(store, now)
    legacy = TINY.replace(norm_eps=1e-6, time_max_period=1e4, fsq={"levels": TINY.fsq.levels, "bound_eps": -1e-3})
    check_job_settings(store, {**now, "model": {**now["model"], "config": legacy.to_dict()}})


def test_latest_model_file_prefers_the_export_then_the_newest_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        latest_model_file(tmp_path)
    for step in (2, 10):
        (tmp_path / f"checkpoint_{step:08d}").mkdir()
        (tmp_path / f"checkpoint_{step:08d}" / MODEL_FILE).write_bytes(b"x")
    assert latest_model_file(tmp_path).parent.name == "checkpoint_00000010"
    (tmp_path / MODEL_FILE).write_bytes(b"x")
    assert latest_model_file(tmp_path) == tmp_path / MODEL_FILE


def test_summary_lines_say_what_happened():
    done = {"run": "runs/x", "step": 5, "loss": 0.5, "nothing_to_do": True}
    assert "already finished (5 steps, loss 0.5000); nothing to do" in summary_line("train-tokenizer", done)
    line = summary_line("train-generator", {"step": 5, "loss": math.pi, "train_seconds": 75, "world_size": 2,
                                            "model": "runs/x/model.safetensors"})
    assert "5 steps, loss 3.1416, 1m15s" in line and "2 worker(s)" in line
