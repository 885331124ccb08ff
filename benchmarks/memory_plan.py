"""Per-GPU memory of a training run before launch, counted on the meta device (`training.memory`).

For a tokenizer or generator preset, a world size and a GPU size: ddp vs fsdp, with and without
activation checkpointing: static memory (weights, gradients, AdamW, EMA, FSDP's gathered bf16
blocks), activations per row (image or sequence, bf16), and the most rows per GPU that fit.

    python -m benchmarks.memory_plan --tokenizer d18_d28 --world-size 8 --gpu-gb 80
    python -m benchmarks.memory_plan --generator d36 --world-size 8 --gpu-gb 80
"""

from __future__ import annotations

import argparse
import sys

from flextok.config import TOKENIZER_PRESETS, get_preset
from flextok.gpt import GPT_PRESETS
from training.memory import GB, largest_micro_batch, memory_plan
from training.tasks import GeneratorTask, TokenizerTask


def table(task, *, world_size: int, gpu_gb: float, reserve_gb: float) -> str:
    rows = ["| strategy | act. ckpt | static GB/GPU | activations GB/row | rows/GPU that fit | total GB at that batch |",
            "|---|---|---|---|---|---|"]
    for strategy in ("ddp", "fsdp"):
        for ac in (False, True):
            one = memory_plan(task, strategy=strategy, world_size=world_size, micro_batch=1,
                              activation_checkpointing=ac)
            fit = largest_micro_batch(task, strategy=strategy, world_size=world_size, activation_checkpointing=ac,
                                      gpu_bytes=gpu_gb * GB, reserve=reserve_gb * GB)
            static = one.total - one.activations
            total = static + fit * one.activations
            rows.append(f"| {strategy} | {'yes' if ac else 'no'} | {static / GB:.1f} | {one.activations / GB:.3f} | "
                        f"{fit if fit else 'none'} | {total / GB:.1f} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_plan", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tokenizer", choices=sorted(TOKENIZER_PRESETS), help="a tokenizer preset (trains all weights)")
    what.add_argument("--generator", choices=sorted(GPT_PRESETS), help="a class-conditional generator preset")
    p.add_argument("--world-size", type=int, default=8, help="GPUs (default %(default)s)")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory per GPU in GB (default %(default)s)")
    p.add_argument("--reserve-gb", type=float, default=4.0,
                   help="kept free for the CUDA context, allocator and buffers (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokenizer:
        task, name = TokenizerTask(config=get_preset(args.tokenizer), preset=args.tokenizer), f"tokenizer {args.tokenizer}"
    else:
        task = GeneratorTask(config=GPT_PRESETS[args.generator], tokenizer_id=None, tokenizer_sha256=None)
        name = f"generator {args.generator}"
    one = memory_plan(task, strategy="ddp", world_size=args.world_size, micro_batch=1, activation_checkpointing=False)
    print(f"{name}: {one.parameters / 1e9:.2f} B parameters ({one.trainable / 1e9:.2f} B trained), "
          f"{args.world_size} x {args.gpu_gb:g} GB, bf16 compute, fp32 master weights, AdamW, EMA; "
          f"{args.reserve_gb:g} GB per GPU kept free")
    print(table(task, world_size=args.world_size, gpu_gb=args.gpu_gb, reserve_gb=args.reserve_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
