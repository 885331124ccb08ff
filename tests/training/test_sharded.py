"""FSDP2 and DDP on 2 Ray Train workers (gloo, CPU) against one process: same losses, same weights.

The reference runs the same two half-batches in one process, each half with the noise stream its
worker would draw (`noise_seed(seed, rank, step)`), and averages the two losses: exactly the update that two
data-parallel workers make. Differences can only come from the sharding, the gradient reduction or the
sharded optimizer and EMA.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from flextok.config import get_preset
from flextok.gpt import GPTConfig
from training.settings import TrainConfig
from training.tasks import GeneratorTask, TokenizerTask
from training.trainer import Trainer, noise_seed

STEPS = 20
BATCH = 8  # global: 4 rows per worker
TINY_TOKENIZER = get_preset("tiny").replace(encoder_dim=32, decoder_dim=32, encoder_depth=2, decoder_depth=2,
                                             head_dim=16)
TINY_GPT = GPTConfig.from_preset("tiny", depth=2, dim=64, num_heads=2)


def _cfg(strategy: str, workers: int) -> TrainConfig:
    return TrainConfig(max_steps=STEPS, warmup_steps=2, lr=3e-3, batch_size=BATCH, num_workers=workers,
                       strategy=strategy, ema_decay=0.9, seed=3)


def _batches(kind: str) -> list[Any]:
    """The same batch at every step (so that the loss falls), with fresh noise each step."""
    g = torch.Generator().manual_seed(0)
    if kind == "tokenizer":
        return [torch.rand(BATCH, 3, 32, 32, generator=g) * 2 - 1] * STEPS
    labels = torch.randint(0, 10, (BATCH,), generator=g)
    return [{"tokens": torch.randint(0, 1000, (BATCH, 32), generator=g), "cond": labels, "label": labels}] * STEPS


def _task(kind: str):
    if kind == "tokenizer":
        return TokenizerTask(config=TINY_TOKENIZER, preset="tiny")
    return GeneratorTask(config=TINY_GPT, tokenizer_id="t", tokenizer_sha256=None)


def _half(batch: Any, rank: int) -> Any:
    n = BATCH // 2
    if isinstance(batch, dict):
        return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    return batch[rank * n:(rank + 1) * n]


def _full_ema(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.gather_ema()
    return {k: v.detach().clone() for k, v in trainer.ema_model.state_dict().items()} if trainer.is_main else {}


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    kind, strategy = config["kind"], config["strategy"]
    task = _task(kind)
    trainer = Trainer(task, _cfg(strategy, 2), torch.device("cpu"), is_main=rank == 0,
                      wrap=lambda m: DistributedDataParallel(m))
    trainer.reseed(rank)
    losses = []
    for batch in _batches(kind):
        loss, _, _ = trainer.train_step(_half(batch, rank))
        torch.distributed.all_reduce(loss)
        losses.append(float(loss) / 2)
    ema = {k: v.numpy() for k, v in _full_ema(trainer).items()}  # Ray Train returns no tensors
    return {"losses": losses, "ema": ema, "sharded": trainer.sharded}


@dataclass
class _TwoHalves:
    """One process doing what two workers do: each half-batch with its worker's noise, losses averaged.

    The trainer (rank 0) passes its own noise, seeded for rank 0 at each step; rank 1's is seeded here."""

    task: Any
    seed: int
    step: int = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def loss(self, model, batch, generator):
        rank1 = torch.Generator().manual_seed(noise_seed(self.seed, 1, self.step))
        self.step += 1
        return (self.task.loss(model, _half(batch, 0), generator) + self.task.loss(model, _half(batch, 1), rank1)) / 2


def _reference(kind: str) -> dict[str, Any]:
    cfg = _cfg("ddp", 1)
    trainer = Trainer(_TwoHalves(_task(kind), cfg.seed), cfg, torch.device("cpu"))
    losses = [float(trainer.train_step(batch)[0]) for batch in _batches(kind)]
    return {"losses": losses, "ema": _full_ema(trainer)}


def _run_workers(ray_local, kind: str, strategy: str) -> dict[str, Any]:
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    result = TorchTrainer(
        worker_loop, train_loop_config={"kind": kind, "strategy": strategy},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
    ).fit()
    return result.return_value


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["generator", "tokenizer"])
def test_fsdp_and_ddp_on_two_workers_match_one_process(ray_local, kind):
    reference = _reference(kind)
    assert reference["losses"][-1] < reference["losses"][0]  # it trains
    for strategy in ("fsdp", "ddp"):
        got = _run_workers(ray_local, kind, strategy)
        assert got["sharded"] == (strategy == "fsdp")
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]),
                                   rtol=1e-4, atol=1e-5, msg=lambda m, s=strategy: f"{s}: {m}")
        assert got["ema"].keys() == reference["ema"].keys()
        for name, value in reference["ema"].items():
            torch.testing.assert_close(torch.from_numpy(got["ema"][name]), value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, s=strategy, n=name: f"{s} EMA {n}: {m}")


def test_gradient_accumulation_is_one_big_batch():
    """Two micro-batches of 4 make the update one batch of 8 makes (no CFG dropout: no noise at all)."""
    config = TINY_GPT.replace(cond_dropout_prob=0.0, depth=1, dim=32)
    task = GeneratorTask(config=config, tokenizer_id="t", tokenizer_sha256=None)
    batch = _batches("generator")[0]
    whole = Trainer(task, _cfg("ddp", 1), torch.device("cpu"))
    split = Trainer(task, _cfg("ddp", 1).replace(grad_accum=2), torch.device("cpu"))
    for _ in range(2):
        loss_whole, norm_whole, _ = whole.train_step(batch)
        loss_split, norm_split, _ = split.train_step(_half(batch, 0), _half(batch, 1))
        torch.testing.assert_close(loss_split, loss_whole)
        torch.testing.assert_close(norm_split, norm_whole)
    for (name, a), b in zip(whole.model.state_dict().items(), split.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("changes, message", [
    ({"strategy": "zero3"}, "strategy must be one of"),
    ({"batch_size": 8, "num_workers": 2, "grad_accum": 3}, "2 workers x 3 accumulation steps"),
    ({"max_failures": -2}, "-1 for unlimited"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_unlimited_retries_and_micro_batches():
    cfg = TrainConfig(batch_size=64, num_workers=2, grad_accum=4, max_failures=-1)
    assert (cfg.worker_batch_size, cfg.micro_batch_size) == (32, 8)
