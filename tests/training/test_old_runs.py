"""Checkpoints and run folders written before the tokenizer's training objective left its architecture
config still load, train on as they did, and resume (tests/fixtures/tokenizer_run_d054511: a run
folder written by the code of that commit)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from flextok import FlexTok
from flextok.checkpoint import read_metadata
from flextok.config import TokenizerObjective
from flextok.tokenizer import OBJECTIVE_KEY
from jobs.train_tokenizer import build_parser, main, model_config, objective
from pipelines.corpus import build_corpus
from training.settings import TrainConfig
from training.tasks import TokenizerTask
from training.trainer import Trainer

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tokenizer_run_d054511"
ASSETS = Path(__file__).parents[2] / "flextok" / "assets"
GOLDEN = Path(__file__).parents[1] / "fixtures" / "official_golden" / "release"
ARCH = ["--encoder-dim", "32", "--decoder-dim", "32", "--encoder-depth", "1", "--decoder-depth", "1", "--head-dim", "16"]
TINY_OBJECTIVE = TokenizerObjective(nested_dropout_mode="pow2", uniform_time_fraction=0.25)  # the tiny preset's


def test_a_checkpoint_from_before_the_split_trains_on_as_the_code_that_wrote_it():
    """Two steps from its checkpoint 2 on a fixed batch give the losses the code before the split gave
    (bit for bit): the objective the run recorded inside its architecture config is the one applied now."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    job = json.loads((FIXTURE / "run" / "job.json").read_text())
    args = build_parser().parse_args(["--data", "x", "--output", "y", *ARCH])
    task = TokenizerTask(config=model_config(args), preset="tiny", objective=objective(args))
    assert task.objective == TINY_OBJECTIVE
    trainer = Trainer(task, TrainConfig(**job["train"]), torch.device("cpu"))
    assert trainer.load(FIXTURE / "run" / "checkpoint_00000002")["step"] == expected["resumed_step"]
    trainer.reseed(0)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert [trainer.train_step(images)[0].item() for _ in range(2)] == expected["losses"]


def test_old_checkpoints_give_the_objective_they_recorded_to_a_fine_tune():
    """A shipped tokenizer (objective inside its config, as its model card shows) and the official golden
    release (its config.json: null condition 0.2, uniform nested dropout) load, and --init trains on
    with their objectives."""
    fm = ASSETS / "fashion-mnist" / "tokenizer.safetensors"
    assert FlexTok.objective_of(fm) == TokenizerObjective(time_sampling="uniform", uniform_time_fraction=0.25,
                                                          noise_time_fraction=0.5)
    args = build_parser().parse_args(["--data", "x", "--output", "y", "--init", str(fm), "--cond-dropout", "0.05"])
    assert objective(args, str(fm)) == FlexTok.objective_of(fm).replace(cond_dropout_prob=0.05)
    assert model_config(args, str(fm)) == FlexTok.from_pretrained(fm).config
    assert FlexTok.objective_of(GOLDEN) == TokenizerObjective(cond_dropout_prob=0.2, nested_dropout_mode="uniform")
    assert FlexTok.objective_of(FIXTURE / "run" / "checkpoint_00000002" / "model.safetensors") == TINY_OBJECTIVE


@pytest.mark.slow
def test_a_run_folder_from_before_the_split_resumes_and_finishes(ray_local, tmp_path, capsys):
    """Re-running the command that wrote it resumes at step 2 (its job.json is accepted as the same
    settings) and finishes; the final model records the run's objective beside its architecture."""
    run, corpus = tmp_path / "run", tmp_path / "corpus"
    shutil.copytree(FIXTURE / "run", run)
    build_corpus("fashion-mnist", corpus, limit=16, samples_per_shard=16)
    argv = ["--data", str(corpus), "--output", str(run), *ARCH, "--threads", "1", "--warmup-steps", "1",
            "--log-every", "1", "--batch-size", "4", "--max-steps", "4", "--checkpoint-every", "2",
            "--grid-every", "0", "--max-failures", "0"]
    assert main(argv) == 0
    assert "train-tokenizer: 4 steps" in capsys.readouterr().out
    metadata = read_metadata(run / "model.safetensors")
    assert json.loads(metadata[OBJECTIVE_KEY]) == TINY_OBJECTIVE.to_dict()
    assert "nested_dropout_mode" not in json.loads(metadata["config"])
    assert json.loads(metadata["step"]) == 4
    state = json.loads(read_metadata(run / "checkpoint_00000004" / "train_state.safetensors")["train_state"])
    assert state["items_seen"] == 4 * 4  # two steps before the kill, two after the resume
