"""What adaptive length costs at tokenize time: images/s of plain `tokenize` and of `tokenize_adaptive`
(pow2 and every-length candidates) side by side in one run, on real Fashion-MNIST test images with
the shipped tokenizer, with the mean tokens per image each stores.

    .venv/bin/python -m benchmarks.bench_adaptive [--threads N] [--images N] [--batch-size N] [--repeats N]

Prints a Markdown table (paste into BENCHMARKS.md with the command, machine and date). Each
configuration is timed over the same images, repeats interleaved, best repeat kept: a shared machine's
load then hits every row alike.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import flextok
from flextok import FlexTok
from flextok.adaptive import LengthTarget

TOKENIZER = Path(flextok.__file__).parent / "assets" / "fashion-mnist" / "tokenizer.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--relative-error", type=float, default=0.2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines.corpus import build_corpus
    from pipelines.images import read_corpus

    with tempfile.TemporaryDirectory() as tmp:
        build_corpus("fashion-mnist", Path(tmp) / "test", split="test", limit=args.images)
        images = read_corpus(str(Path(tmp) / "test"), 28).images.float() / 127.5 - 1
    model = FlexTok.from_pretrained(TOKENIZER).eval()
    K = model.config.num_registers
    configs = {
        "tokenize (all K)": None,
        "adaptive, pow2 candidates": LengthTarget(max_relative_error=args.relative_error, candidates="pow2"),
        "adaptive, every length": LengthTarget(max_relative_error=args.relative_error),
    }
    batches = list(images.split(args.batch_size))
    best = {name: float("inf") for name in configs}
    mean_tokens = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, target in configs.items():
                t0 = time.perf_counter()
                if target is None:
                    for b in batches:
                        model.tokenize(b)
                    mean_tokens[name] = float(K)
                else:
                    lengths = torch.cat([model.tokenize_adaptive(b, target).num_tokens for b in batches])
                    mean_tokens[name] = float(lengths.float().mean())
                best[name] = min(best[name], time.perf_counter() - t0)
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"{len(images)} Fashion-MNIST test images, batch {args.batch_size}, shipped tokenizer (K = {K}), "
          f"target: within {100 * args.relative_error:g}% of all K tokens' one-step MSE\n")
    print("| mode | decoder rows per image | images/s | relative to tokenize | mean tokens stored |")
    print("|---|---|---|---|---|")
    plain = len(images) / best["tokenize (all K)"]
    for name, target in configs.items():
        rate = len(images) / best[name]
        rows = 0 if target is None else len(target.lengths(K))
        print(f"| {name} | {rows} | {rate:.1f} | {rate / plain:.2f}x | {mean_tokens[name]:.2f} |")


if __name__ == "__main__":
    main()
