"""`flextok train-tokenizer`: the loop learns, bad input is one line, and the Ray Train job runs,
resumes after a killed worker, and leaves a finished run alone."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from run_helpers import scalars

from flextok import FlexTok
from flextok.checkpoint import SAME_TOKENS_KEY, file_sha256, read_metadata, same_tokens_shas
from flextok.config import TokenizerObjective
from flextok.tokenizer import OBJECTIVE_KEY
from jobs.train_tokenizer import build_parser, main, model_config, objective
from pipelines.corpus import build_corpus
from pipelines.decode import decode_batch
from pipelines.sources import read_shard, resolve_inputs
from training.data import PixelCollate
from training.loop import CRASH_MARKER_ENV, CRASH_STEP_ENV
from training.settings import TrainConfig
from training.tasks import TokenizerTask
from training.trainer import Trainer

# Small enough for 2 shared cores: 1+1 layers of width 32.
ARCH = ["--encoder-dim", "32", "--decoder-dim", "32", "--encoder-depth", "1", "--decoder-depth", "1", "--head-dim", "16"]
FAST = ["--threads", "1", "--warmup-steps", "1", "--grid-images", "2", "--grid-steps", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """96 real Fashion-MNIST photos (Debian package) in 3 WebDataset shards."""
    out = tmp_path_factory.mktemp("fm")
    build_corpus("fashion-mnist", out, limit=96, samples_per_shard=32)
    return out


@pytest.fixture(scope="module")
def real_batch(corpus):
    """8 decoded corpus images through the pipeline's own reader, decoder and the job's collate."""
    plan = resolve_inputs(str(corpus))
    table = pa.concat_tables(list(read_shard(plan.shards[0])))
    decoded = decode_batch(table, image_size=32)
    decoded = decoded.filter(pc.greater_equal(decoded["index"], 0)).slice(0, 8)
    return PixelCollate(32)(decoded)


def tiny_task():
    args = build_parser().parse_args(["--data", "x", "--output", "y", *ARCH])
    return TokenizerTask(config=model_config(args), preset="tiny", objective=objective(args), grid_images=2,
                         grid_steps=2)


def test_architecture_flags_override_the_preset():
    config = tiny_task().config
    assert (config.encoder_dim, config.decoder_depth, config.head_dim, config.image_size) == (32, 1, 16, 32)
    args = build_parser().parse_args(
        ["--data", "x", "--output", "y", "--fsq-levels", "8,8", "--nested-dropout", "uniform", "--uniform-time-fraction", "0.5"])
    assert model_config(args).fsq.levels == (8, 8)
    # the objective is the preset's (tiny: powers-of-two k, a quarter of uniform times) with the flags applied
    assert objective(args) == TokenizerObjective(nested_dropout_mode="uniform", uniform_time_fraction=0.5)
    assert objective(build_parser().parse_args(["--data", "x", "--output", "y"])) == TokenizerObjective(
        nested_dropout_mode="pow2", uniform_time_fraction=0.25)


def test_loss_falls_on_a_fixed_batch_of_real_images(real_batch):
    torch.manual_seed(0)
    task = tiny_task()
    trainer = Trainer(task, TrainConfig(max_steps=15, warmup_steps=2, lr=3e-3, batch_size=8, ema_decay=0.9),
                      torch.device("cpu"))
    images = task.prepare_batch(real_batch, torch.device("cpu"))
    losses = []
    for _ in range(15):
        trainer.reseed(0)  # the same noise every step: only the weights change
        losses.append(trainer.train_step(images)[0].item())
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    grid, rows, cols = task.grid(trainer.ema.model, images)
    assert grid.shape == (2, 7, 3, 32, 32) and rows is None and cols == ["input", "k=1", "k=2", "k=4", "k=8", "k=16", "k=32"]
    assert torch.equal(grid[:, 0], images[:2])


def test_init_starts_from_the_checkpoint_and_keeps_its_architecture(real_batch, tmp_path):
    torch.manual_seed(1)
    start = FlexTok.from_config(tiny_task().config)
    trained_with = TokenizerObjective(nested_dropout_mode="pow2", cond_dropout_prob=0.2)
    path = start.save_pretrained(tmp_path / "start.safetensors", extra={OBJECTIVE_KEY: trained_with.to_dict()})
    args = build_parser().parse_args(["--data", "x", "--output", "y", "--init", str(path),
                                      "--uniform-time-fraction", "0.7", "--full-k-fraction", "0.5"])
    config = model_config(args, str(path))
    assert config == start.config
    # the objective it was trained with, and the flags on top (training behaviour may change)
    assert objective(args, str(path)) == trained_with.replace(uniform_time_fraction=0.7, full_k_fraction=0.5)
    task = TokenizerTask(config=config, preset=None, objective=objective(args, str(path)), init_path=str(path),
                         init_sha256=start.checkpoint_sha256)
    torch.manual_seed(2)  # a different seed would give different random weights
    trainer = Trainer(task, TrainConfig(max_steps=2, warmup_steps=0, batch_size=8), torch.device("cpu"))
    for name, tensor in start.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
        assert torch.equal(trainer.ema.model.state_dict()[name], tensor), name  # the EMA starts there too
    assert task.describe()["init_sha256"] == start.checkpoint_sha256
    trainer.train_step(task.prepare_batch(real_batch, torch.device("cpu")))
    assert trainer.step == 1
    for flags in (["--encoder-dim", "64"], ["--preset", "tiny"], ["--fsq-levels", "8,8"]):
        args = build_parser().parse_args(["--data", "x", "--output", "y", "--init", str(path), *flags])
        with pytest.raises(ValueError, match="--init takes the architecture"):
            model_config(args, str(path))


def test_init_with_a_deeper_decoder_grows_it_and_keeps_the_reconstructions(real_batch, tmp_path):
    torch.manual_seed(4)
    start = FlexTok.from_config(tiny_task().config.replace(decoder_depth=2))
    with torch.no_grad():  # trained-like: non-zero modulations, so the check below is not trivially true
        for p in start.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = start.save_pretrained(tmp_path / "start.safetensors")
    grow = ["--data", "x", "--output", "y", "--init", str(path), "--freeze-encoder"]
    config = model_config(build_parser().parse_args([*grow, "--decoder-depth", "4"]), str(path))
    assert config == start.config.replace(decoder_depth=4)
    task = TokenizerTask(config=config, preset=None, init_path=str(path), init_sha256=start.checkpoint_sha256,
                         same_tokens_as=(start.checkpoint_sha256,))
    model = task.build_model(torch.device("cpu"))
    images = task.prepare_batch(real_batch, torch.device("cpu"))[:4]
    tokens = start.tokenize(images)
    assert torch.equal(model.tokenize(images), tokens)
    assert torch.equal(model.detokenize(tokens, steps=2, generator=torch.Generator().manual_seed(0)),
                       start.detokenize(tokens, steps=2, generator=torch.Generator().manual_seed(0)))
    assert not any(p.requires_grad for p in model.encoder.parameters())  # --freeze-encoder still holds
    with pytest.raises(ValueError, match="not remove them"):
        model_config(build_parser().parse_args([*grow, "--decoder-depth", "1"]), str(path))


def test_freeze_encoder_trains_the_decoder_and_keeps_every_token(real_batch, tmp_path):
    torch.manual_seed(3)
    start = FlexTok.from_config(tiny_task().config)
    path = start.save_pretrained(tmp_path / "start.safetensors", extra={SAME_TOKENS_KEY: ["a" * 64]})
    task = TokenizerTask(config=start.config, preset=None, init_path=str(path), init_sha256=start.checkpoint_sha256,
                         same_tokens_as=tuple(sorted(same_tokens_shas(path))))
    trainer = Trainer(task, TrainConfig(max_steps=4, warmup_steps=0, lr=3e-3, batch_size=8, ema_decay=0.5),
                      torch.device("cpu"))
    images = task.prepare_batch(real_batch, torch.device("cpu"))
    for _ in range(4):
        trainer.train_step(images)
    decoder_moved = 0
    for name, tensor in start.state_dict().items():
        for model in (trainer.model, trainer.ema.model):
            if name.startswith("decoder."):
                decoder_moved += not torch.equal(model.state_dict()[name], tensor)
            else:
                assert torch.equal(model.state_dict()[name], tensor), name  # bit-identical, EMA too
    assert decoder_moved > 0
    assert torch.equal(trainer.ema.model.tokenize(images), start.tokenize(images))
    out = tmp_path / "tuned.safetensors"
    task.save_pretrained(trainer.ema.model, out, step=4)
    # its own sha, the init's and the init's own parent: generators trained on any of them stay valid
    assert same_tokens_shas(out) == {file_sha256(out), start.checkpoint_sha256, "a" * 64}
    assert task.describe()["same_tokens_as_sha256"] == sorted([start.checkpoint_sha256, "a" * 64])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--init", "/no/such/checkpoint.safetensors"], "checkpoint not found"),
        (["--freeze-encoder"], "give --init"),
        (["--encoder-dim", "40"], "not a multiple of head_dim"),
        (["--batch-size", "9", "--workers", "2"], "split evenly"),
    ],
)
def test_bad_settings_are_one_line_errors(extra, message, corpus, tmp_path, capsys):
    assert main(["--data", str(corpus), "--output", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flextok train-tokenizer: error:") and message in err and len(err.strip().splitlines()) == 1


def test_missing_data_and_output_inside_data_are_one_line_errors(corpus, tmp_path, capsys):
    assert main(["--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "run"), *ARCH]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["--data", str(corpus), "--output", str(corpus / "run"), *ARCH]) == 2
    assert "lies inside --data" in capsys.readouterr().err
    assert not (corpus / "run").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_tokenizer_end_to_end_then_a_rerun_does_nothing(ray_local, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    val = tmp_path / "val"  # held-out images: real Fashion-MNIST test photos
    build_corpus("fashion-mnist", val, split="test", limit=20, samples_per_shard=20)
    argv = ["--data", str(corpus), "--output", str(run), *ARCH, *FAST, "--max-steps", "4", "--batch-size", "8",
            "--checkpoint-every", "2", "--grid-every", "2", "--val-data", str(val), "--val-items", "12"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train-tokenizer: 4 steps" in out
    val_losses = scalars(run, "val/loss")
    assert [s for _, s, _ in val_losses] == [2, 4] and all(0 < v < 10 for _, _, v in val_losses)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(val_losses[-1][2], rel=1e-5)
    model = FlexTok.from_pretrained(run / "model.safetensors")
    assert (model.config.encoder_dim, model.config.decoder_depth) == (32, 1)
    assert read_metadata(run / "model.safetensors")["step"] == "4"
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_00000002", "checkpoint_00000004"]
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert [s for _, s, _ in scalars(run)] == [1, 2, 3, 4]
    assert [s for _, s, _ in scalars(run, "train/images_per_second")] == [1, 2, 3, 4]

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    time.sleep(0.01)
    assert main(argv) == 0
    assert "already finished (4 steps" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


@pytest.mark.slow
def test_a_killed_worker_resumes_exactly_where_it_was(ray_local, corpus, tmp_path, monkeypatch, capsys):
    """2 ddp workers; rank 0 really dies (os._exit) at step 5, in the middle of an epoch and of a shuffle
    window; Ray Train restarts the group from checkpoint 4 and finishes. From step 5 on, every loss is
    bit-identical to an uninterrupted run's: the same images (the data position is in the checkpoint)
    and the same nested-dropout, time and noise draws (seeded by seed, rank and step)."""
    run, marker, whole = tmp_path / "run", tmp_path / "killed", tmp_path / "whole"
    # 3 shards of 32 images, dealt to 2 workers (1 or 2 shards each: an epoch is 8 or 16 steps of
    # 4 images per worker); windows of at least 24 images are whole shards here.
    argv = ["--data", str(corpus), *ARCH, *FAST, "--max-steps", "7", "--batch-size", "8", "--workers", "2",
            "--shuffle-buffer", "24", "--checkpoint-every", "2", "--keep-checkpoints", "4", "--grid-every", "0",
            "--max-failures", "1"]
    assert main(["--output", str(whole), *argv]) == 0
    monkeypatch.setenv(CRASH_STEP_ENV, "5")
    monkeypatch.setenv(CRASH_MARKER_ENV, str(marker))
    assert main(["--output", str(run), *argv]) == 0
    assert marker.read_text().startswith("killed at step 5")
    assert "train-tokenizer: 7 steps" in capsys.readouterr().out
    assert read_metadata(run / "model.safetensors")["step"] == "7"
    losses = scalars(run)
    first = {s: v for f, s, v in losses if f == 0}
    second = {s: v for f, s, v in losses if f == 1}
    assert sorted(first) == [1, 2, 3, 4]  # died at step 5, before logging it
    assert sorted(second) == [5, 6, 7]  # resumed after checkpoint 4, not from step 0
    uninterrupted = {s: v for _, s, v in scalars(whole)}
    assert second == {s: uninterrupted[s] for s in (5, 6, 7)}  # bit-identical
    assert first == {s: uninterrupted[s] for s in (1, 2, 3, 4)}
    state = json.loads(read_metadata(run / "checkpoint_00000004" / "train_state.safetensors")["train_state"])
    assert state["step"] == 4 and state["items_seen"] == 4 * 8
    position = state["data_position"]
    assert position["world_size"] == 2 and position["num_units"] == 3
    assert all(p[0] == 0 and p[2] > 0 for p in position["positions"]), position  # mid-epoch, mid-window
    assert np.float32(state["loss"]) == np.float32(first[4])  # the loss it resumed with is where it was
    assert json.loads((run / "train_summary.json").read_text())["items_seen"] == 7 * 8
    resumed_weights, whole_weights = (FlexTok.from_pretrained(r / "model.safetensors").state_dict() for r in (run, whole))
    assert all(torch.equal(v, whole_weights[k]) for k, v in resumed_weights.items())  # the same EMA model

    (run / "train_summary.json").unlink()  # as if it had stopped at its last checkpoint
    elsewhere = ["--output", str(run), *argv]
    elsewhere[elsewhere.index("--workers") + 1] = "1"
    assert main(elsewhere) != 0  # refused before any worker starts, in one line
    assert "trained on 2 worker(s) and its data position is per worker; resume it with --workers 2" in \
        capsys.readouterr().err


def test_latent_presets_need_the_vae_weights(tmp_path):
    """A latent-space preset without --vae would train on a random VAE's latents: refused; --vae names the
    weights the workers load (an existing file), and pixel presets take no VAE."""
    def config(*argv):
        return model_config(build_parser().parse_args(["--data", "d", "--output", "o", *argv]))

    with pytest.raises(ValueError, match="give the VAE's weights with --vae PATH"):
        config("--preset", "d12_d12")
    with pytest.raises(ValueError, match="checkpoint not found"):
        config("--preset", "d12_d12", "--vae", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="trains on pixels, without a VAE"):
        config("--vae", str(tmp_path / "vae.safetensors"))
    weights = tmp_path / "vae.safetensors"
    weights.write_bytes(b"")  # only its path is recorded here; the workers load it
    assert config("--preset", "d12_d12", "--vae", str(weights)).vae.path == str(weights.resolve())


def test_undecodable_samples_are_reported_once_not_every_batch_and_epoch():
    from training.data import _SkipLog

    skips = _SkipLog(every_s=300, remember=4)
    assert skips.add(["a/1", "a/2"], ["truncated JPEG", "bad"], now=0.0) == "skipping undecodable samples, e.g. a/1: truncated JPEG"
    assert skips.add(["a/1", "a/2"], ["truncated JPEG", "bad"], now=100.0) is None  # the next epoch: seen
    assert skips.add(["b/1"], ["bad"], now=110.0) is None  # new, but a line is not due yet
    assert skips.add(["b/2"], ["bad"], now=301.0) == "skipped 2 more undecodable samples (4 in this process)"
    assert skips.add(["a/1", "b/1", "b/2"], ["bad"] * 3, now=1200.0) is None
    # Past `remember` keys, new ones are still counted, but not remembered: they may count again.
    assert skips.add(["c/1"], ["bad"], now=1300.0) == "skipped 1 more undecodable samples (5 in this process)"
    assert skips.add(["c/1"], ["bad"], now=1700.0) == "skipped 1 more undecodable samples (6 in this process)"


@pytest.mark.slow
def test_images_on_s3_with_one_parquet_file_of_twelve_that_holds_no_images(ray_local, s3_server, corpus, tmp_path,
                                                                               subprocess_env):
    """--data on the S3 server: 11 Parquet files of real photos and one whose `image` column holds ints.
    The bad file is skipped up front in one warning line that names it; the job trains on the rest,
    without a traceback or a line per epoch (the 88 images are read 4 times over)."""
    import subprocess
    import sys

    rows = pa.concat_tables(list(read_shard(resolve_inputs(str(corpus)).shards[0])))
    rows = rows.filter(pc.greater_equal(rows["index"], 0))
    fs = s3_server.filesystem()
    bucket = s3_server.make_bucket("tok")
    for i in range(12):
        table = (pa.table({"image": list(range(8)), "label": [0] * 8}) if i == 5 else
                 pa.table({"image": rows["image"].slice(8 * i, 8), "label": rows["label"].slice(8 * i, 8)}))
        pq.write_table(table, tmp_path / f"f{i:02d}.parquet")
        fs.put_file(str(tmp_path / f"f{i:02d}.parquet"), f"{bucket}/pq/f{i:02d}.parquet")
    run = tmp_path / "run"
    argv = ["--data", f"s3://{bucket}/pq", "--output", str(run), *ARCH, *FAST, "--max-steps", "44", "--batch-size", "8",
            "--log-every", "11", "--checkpoint-every", "44", "--grid-every", "0"]
    proc = subprocess.run([sys.executable, "-m", "jobs.train_tokenizer", *argv], capture_output=True, text=True,
                          env=subprocess_env(ray_local.env, s3_server.env), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    named = [line for line in out.splitlines() if "f05" in line]
    assert len(named) == 1 and "skipping 1 of 12 Parquet files that hold no images" in named[0], out
    assert f"s3://{bucket}/pq/f05.parquet: unreadable shard: column 'image' holds int64" in named[0], named
    assert "Traceback" not in out and "undecodable" not in out and len(out.splitlines()) < 25, out
    assert json.loads((run / "train_summary.json").read_text())["items_seen"] == 44 * 8
    assert "data: s3://" in out and "11 parquet shard(s)" in out
