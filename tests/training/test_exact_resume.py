"""Exact resume in one process: a Trainer and its row stream restored from a checkpoint (weights, AdamW,
EMA, step, the data position) make bit-identical steps to the ones that were never stopped."""

from __future__ import annotations

import torch
from test_data_stream import NUM_CLASSES, write_token_files

from flextok.gpt import GPTConfig
from pipelines.writer import OutputStore
from training.data import RowStream, batch_stream, inspect_tokens, resume_position, token_source
from training.runs import checkpoint_dir_name, saved_train_state
from training.settings import TrainConfig
from training.tasks import GeneratorTask
from training.trainer import Trainer

STEPS, CUT, WINDOW = 6, 3, 16


def test_a_restored_trainer_and_stream_repeat_the_uninterrupted_losses(tmp_path):
    write_token_files(tmp_path, rows_per_file=6)  # 60 rows: an epoch is 7 batches of 8, so step 6 is in epoch 0
    data = inspect_tokens(OutputStore(str(tmp_path)))
    source = token_source(str(tmp_path), {}, data, "class", WINDOW)
    # CFG dropout on: the class drop is one of the draws that must repeat
    config = GPTConfig.from_preset("tiny", depth=1, dim=32, num_heads=2, num_classes=NUM_CLASSES, cond_dropout_prob=0.5)
    task = GeneratorTask(config=config, tokenizer_id="t", tokenizer_sha256=None)
    cfg = TrainConfig(max_steps=STEPS, batch_size=8, warmup_steps=1, lr=3e-3, seed=5, shuffle_buffer=WINDOW)
    device = torch.device("cpu")

    def train(trainer: Trainer, stream: RowStream, steps: int) -> list[float]:
        batches = batch_stream(stream, task.collate_fn(), cfg.batch_size)
        losses = []
        for _ in range(steps):
            batch, trainer.data_position = next(batches)
            losses.append(trainer.train_step(task.prepare_batch(batch, device))[0].item())
        batches.close()
        return losses

    def stream(position=None) -> RowStream:
        extra = {} if position is None else {"position": position}
        return RowStream(source, seed=cfg.seed, rank=0, world_size=1, window_rows=WINDOW, **extra)

    whole = train(Trainer(task, cfg, device), stream(), STEPS)
    first = Trainer(task, cfg, device)
    before = train(first, stream(), CUT)
    position = first.data_position
    first.data_position = {"world_size": 1, "num_units": source.num_units, "positions": [position.to_list()]}
    folder = tmp_path / checkpoint_dir_name(CUT)
    first.save(folder)
    saved = saved_train_state(OutputStore(str(tmp_path)), CUT)  # what the driver reads before a resume
    assert saved["step"] == CUT and saved["data_position"]["positions"] == [position.to_list()]

    restored = Trainer(task, cfg, device)
    state = restored.load(folder)
    again = resume_position(state["data_position"], source.num_units, 0, 1, restored.step)
    assert again == position and position.row > 0  # mid-window
    after = train(restored, stream(again), STEPS - CUT)
    assert before + after == whole  # bit for bit
