"""Sampling throughput of the generator: KV cache vs full recomputation, and CFG batched.

Measures sequences/s for K-token class-conditional sampling at a fixed batch size (fp32, random
weights: the cost of sampling does not depend on what the weights learned), for
  - kv-cache:      prefill the prefix, then one decode step per token;
  - kv-cache+cfg:  the same with conditional and unconditional rows in one batch (2B rows);
  - recompute:     the whole sequence re-run for every new token (the reference, no cache).

    python -m benchmarks.bench_generator                       # tiny and mid, batch 64
    python -m benchmarks.bench_generator --configs tiny --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

from flextok.generator import Generator
from flextok.gpt import GPT_PRESETS, GPTConfig, count_parameters

CONFIGS: dict[str, GPTConfig] = {
    "tiny": GPT_PRESETS["tiny"],  # 1,000 codes, K = 32, width 256, depth 4
    # Paper vocabulary and K at a CPU-friendly width.
    "mid": GPTConfig(codebook_size=64_000, max_tokens=256, depth=8, dim=512, num_heads=8, num_classes=1000),
}
MODES = {
    "kv-cache": {"use_kv_cache": True, "cfg_scale": None},
    "kv-cache+cfg": {"use_kv_cache": True, "cfg_scale": 2.0},
    "recompute": {"use_kv_cache": False, "cfg_scale": None},
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(model: Generator, mode: str, batch_size: int, repeats: int) -> float:
    """Best-of-`repeats` wall time (s) to sample `batch_size` sequences of K tokens."""
    labels = torch.arange(batch_size) % model.config.num_classes
    model.generate(labels[:2], num_tokens=4, **MODES[mode])  # warm-up
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        out = model.generate(labels, generator=torch.Generator().manual_seed(r), top_k=100, **MODES[mode])
        best = min(best, time.perf_counter() - start)
        assert out.shape == (batch_size, model.config.max_tokens), "wrong output shape"
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,mid", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--recompute-batch-size", type=int, default=None, help="batch for recompute (default: --batch-size)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cell (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--markdown", default=None, help="append the result section to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_at_start = os.getloadavg()[0]
    rows = []
    for name in args.configs.split(","):
        config = CONFIGS[name]
        model = Generator(config).eval()
        label = (
            f"{name} (V={config.vocab_size}, K={config.max_tokens}, D={config.dim}, "
            f"depth={config.depth}, {count_parameters(model) / 1e6:.1f} M)"
        )
        results = []  # (mode, batch, seconds)
        for mode in args.modes.split(","):
            recompute = mode == "recompute"
            batch = args.recompute_batch_size if recompute and args.recompute_batch_size else args.batch_size
            repeats = 1 if recompute and config.max_tokens > 64 else args.repeats
            seconds = measure(model, mode, batch, repeats)
            print(f"{name:5s} {mode:13s} batch {batch:3d} {seconds:8.2f} s {batch / seconds:8.2f} seq/s", flush=True)
            results.append((mode, batch, seconds))
        baseline = {mode: batch / seconds for mode, batch, seconds in results}.get("recompute")
        for mode, batch, seconds in results:
            ratio = f"{batch / seconds / baseline:.1f}x" if baseline else "n/a"
            rows.append(
                f"| {label} | {mode} | {batch} | {seconds:.2f} | {batch / seconds:.2f} | "
                f"{batch * config.max_tokens / seconds:,.0f} | {ratio} |"
            )
    command = "python -m benchmarks.bench_generator " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join(
        [
            "",
            "## Generator sampling throughput (KV cache vs recomputation, CFG batched)",
            "",
            f"- Command: `{command.strip()}`",
            f"- Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, fp32; 1-min load average {load_at_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (other jobs share the cores)",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Batch {args.batch_size} class-conditional sequences of K tokens, top-k 100, random weights; "
            "best of the timed runs (one run for recomputation at K > 64). "
            "`kv-cache+cfg` runs 2B rows (conditional and unconditional) in one batch.",
            "",
            "| config | mode | batch | seconds / batch | sequences/s | tokens/s | sequences/s vs recompute |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(section)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
