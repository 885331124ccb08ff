"""The memory plan: static bytes by hand from the parameter counts; activations linear in rows."""

import pytest
import torch

from flextok.config import get_preset
from flextok.generator import Generator
from flextok.gpt import GPTConfig, count_parameters
from training.memory import GB, largest_micro_batch, memory_plan
from training.tasks import GeneratorTask, TokenizerTask

GPT = GPTConfig(codebook_size=1000, max_tokens=32, depth=3, dim=64, num_heads=2, num_classes=10)


def test_static_memory_is_bytes_per_parameter_by_hand():
    task = GeneratorTask(config=GPT, tokenizer_id=None, tokenizer_sha256=None)
    with torch.device("meta"):
        n = count_parameters(Generator(GPT))
    ddp = memory_plan(task, strategy="ddp", world_size=4, micro_batch=2, activation_checkpointing=False)
    fsdp = memory_plan(task, strategy="fsdp", world_size=4, micro_batch=2, activation_checkpointing=False)
    # fp32 weights 4 + gradients 4 + DDP buckets 4 + AdamW 8 + EMA 4 bytes, all on one GPU under ddp.
    assert ddp.parameters == n and ddp.total - ddp.activations == 24 * n
    # fsdp: 20 bytes / 4 GPUs, plus bf16 copies of the root's parameters and two blocks in flight.
    block = 4 * 64 * 64 + 3 * 64 * GPT.mlp_hidden_dim + 2 * 64
    assert fsdp.total - fsdp.activations == pytest.approx(20 * n / 4 + 2 * ((n - 3 * block) + 2 * block))
    assert fsdp.activations == ddp.activations > 0


@pytest.mark.parametrize("task", [
    GeneratorTask(config=GPT, tokenizer_id=None, tokenizer_sha256=None),
    TokenizerTask(config=get_preset("tiny").replace(encoder_dim=32, decoder_dim=32, head_dim=16, encoder_depth=2, decoder_depth=2), preset="tiny"),
], ids=["generator", "tokenizer"])
def test_activations_grow_with_rows_and_checkpointing_keeps_less(task):
    plans = {(b, ac): memory_plan(task, strategy="fsdp", world_size=2, micro_batch=b, activation_checkpointing=ac)
             for b in (1, 4) for ac in (False, True)}
    assert plans[4, False].activations == pytest.approx(4 * plans[1, False].activations, rel=0.05)
    assert plans[4, True].activations < plans[4, False].activations
    fit = largest_micro_batch(task, strategy="fsdp", world_size=2, activation_checkpointing=False,
                              gpu_bytes=0.05 * GB, reserve=0)
    assert fit * plans[1, False].activations <= 0.05 * GB - (plans[1, False].total - plans[1, False].activations)


def test_generator_training_flops_match_torch_flop_counter():
    """The analytic FLOPs per token against torch's FlopCounterMode over a real forward pass (the counter
    counts full rather than causal attention: a few per cent at this size)."""
    from torch.utils.flop_counter import FlopCounterMode

    task = GeneratorTask(config=GPT, tokenizer_id=None, tokenizer_sha256=None)
    model = Generator(GPT)
    batch = task.example_batch(2, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        task.loss(model, batch, None)
    per_token = counter.get_total_flops() / batch["tokens"].numel()
    assert task.train_flops_per_item() / 3 == pytest.approx(per_token, rel=0.05)
