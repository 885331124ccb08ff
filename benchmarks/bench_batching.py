"""Token-budget batching: packed vs length-bucketed vs padded, tokens/s and padding, side by side.

For each length distribution, one generator is trained with `training.trainer.Trainer` (AdamW, EMA,
clipping: the job's step) on micro-batches of the same token budget made by each batching of
`training.batching.budget_batches` from the same rows, and the training throughput is measured in
real tokens per second (tokens of the images, the unit of `train/tokens_per_second`), with the share
of the computed positions that are padding. Blocks of steps alternate between the batchings in one
process (packed, packed 4S, bucketed, padded, packed, ...), so the load of a shared machine hits all
alike. "packed" packs into rows of S = condition + K positions, "packed 4S" into rows of 4S
(`--pack-length`).
Timed: taking the micro-batch from the stream (plan and collate), moving it, and the training step.

Distributions (rows drawn i.i.d.):
  fm32    the adaptive Fashion-MNIST tokens of the shipped EOS generator: 1, 2, 4, .., 32 tokens with
          that run's histogram (21, 92, 727, 1,966, 3,177, 17 of 6,000; mean 11.70), K = 32,
          1,000 codes, the `tiny` GPT (4 blocks, width 256)
  fm256   the same shares at 8x the lengths (8, 16, .., 256 tokens; mean 93.6), K = 256
  uni256  every length 1..256 equally likely (mean 128.5), K = 256
The K = 256 cases keep the 1,000-code head: a 64,000-code head on a 256-wide model would be 85% of
every position's cost, the same for every batching, and hide the attention costs that differ.

    python -m benchmarks.bench_batching
    python -m benchmarks.bench_batching --threads 1 --markdown BENCHMARKS.md
    python -m benchmarks.bench_batching --plans-only        # padding of each batching, no training
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from benchmarks.bench_train import cpu_name
from training.batching import budget_batches

FM_HISTOGRAM = {1: 21, 2: 92, 4: 727, 8: 1966, 16: 3177, 32: 17}  # the shipped generator-eos data


@dataclass(frozen=True)
class Distribution:
    name: str
    lengths: dict[int, float]  # tokens -> probability
    max_tokens: int
    codebook_size: int


def distributions() -> list[Distribution]:
    total = sum(FM_HISTOGRAM.values())
    fm = {n: c / total for n, c in FM_HISTOGRAM.items()}
    return [
        Distribution("fm32", fm, 32, 1000),
        Distribution("fm256", {8 * n: p for n, p in fm.items()}, 256, 1000),
        Distribution("uni256", {n: 1 / 256 for n in range(1, 257)}, 256, 1000),
    ]


class TableRows:
    """A row stream over an in-memory table, cycled (`training.batching.Rows`)."""

    def __init__(self, table: pa.Table) -> None:
        self.table, self.next = table, 0

    @property
    def position(self) -> list[int]:
        return [self.next]

    def take(self, n: int) -> pa.Table:
        rows = np.arange(self.next, self.next + n) % self.table.num_rows
        self.next += n
        return self.table.take(pa.array(rows))


def token_rows(dist: Distribution, num_rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.choice(list(dist.lengths), size=num_rows, p=list(dist.lengths.values()))
    tokens = [rng.integers(0, dist.codebook_size, n).tolist() for n in lengths]
    return pa.table({"tokens": pa.array(tokens, pa.list_(pa.uint16())),
                     "label": pa.array(rng.integers(0, 10, num_rows), pa.int32())})


def measure(dist: Distribution, budget: int, steps: int, blocks: int) -> dict[str, dict[str, float]]:
    from flextok.gpt import GPTConfig
    from training.settings import TrainConfig
    from training.tasks import GeneratorTask
    from training.trainer import Trainer

    config = GPTConfig.from_preset("tiny", codebook_size=dist.codebook_size, max_tokens=dist.max_tokens, use_eos=True)
    task = GeneratorTask(config=config, tokenizer_id="bench", tokenizer_sha256=None)
    table = token_rows(dist, 4096)
    device = torch.device("cpu")
    runs = {}
    S = task.row_length
    for label, batching, row_length in (("packed", "packed", S), ("packed 4S", "packed", 4 * S),
                                        ("bucketed", "bucketed", S), ("padded", "padded", S)):
        cfg = TrainConfig(max_steps=10**6, warmup_steps=1, token_budget=budget, batching=batching,
                          pack_length=row_length if batching == "packed" else None)
        stream = budget_batches(TableRows(table), task.collate_fn(), task.sequence_costs, budget=budget,
                                batching=batching, row_length=row_length, seed=0)
        runs[label] = {"trainer": Trainer(task, cfg, device), "stream": stream, "seconds": 0.0, "host": 0.0,
                          "tokens": 0, "computed": 0, "real": 0, "steps": 0}
    for block in range(blocks + 1):  # block 0 warms up every side (allocator, first-call costs)
        for run in runs.values():
            for _ in range(steps):
                start = time.perf_counter()
                batch, _ = next(run["stream"])
                prepared = task.prepare_batch(batch, device)
                host = time.perf_counter() - start
                run["trainer"].train_step(prepared)
                if block:
                    computed, real = task.positions(prepared)
                    run["seconds"] += time.perf_counter() - start
                    run["host"] += host
                    run["tokens"] += task.num_items(prepared)
                    run["computed"] += computed
                    run["real"] += real
                    run["steps"] += 1
    return {b: {"tokens_per_s": r["tokens"] / r["seconds"], "padding": 1 - r["real"] / r["computed"],
                "tokens_per_step": r["tokens"] / r["steps"], "host_ms": 1000 * r["host"] / r["steps"],
                "step_ms": 1000 * r["seconds"] / r["steps"]} for b, r in runs.items()}


def plan_padding(dist: Distribution, budget: int, num_rows: int = 8192) -> dict[str, float]:
    """Padding of each batching's plans over `num_rows` rows (no training: exact, machine-independent)."""
    from flextok.gpt import GPTConfig
    from training.tasks import GeneratorTask

    config = GPTConfig.from_preset("tiny", codebook_size=dist.codebook_size, max_tokens=dist.max_tokens, use_eos=True)
    task = GeneratorTask(config=config, tokenizer_id="bench", tokenizer_sha256=None)
    table, S, out = token_rows(dist, num_rows), task.row_length, {}
    for label, batching, row_length in (("packed", "packed", S), ("packed 4S", "packed", 4 * S),
                                        ("bucketed", "bucketed", S), ("padded", "padded", S)):
        stream = budget_batches(TableRows(table), task.collate_fn(), task.sequence_costs, budget=budget,
                                batching=batching, row_length=row_length, seed=0)
        computed = real = 0
        while real < num_rows * sum(n * p for n, p in dist.lengths.items()):  # about num_rows rows
            batch, _ = next(stream)
            plan = batch["budget_batch"]
            computed, real = computed + plan.positions, real + plan.real
        out[label] = 1 - real / computed
    return out


def table_lines(results: dict[str, dict[str, dict[str, float]]], budgets: dict[str, int]) -> list[str]:
    lines = ["| lengths | budget | batching | tokens/s | vs padded | padding | tokens/step | ms/step (batching) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by_batching in results.items():
        base = by_batching["padded"]["tokens_per_s"]
        for batching, r in by_batching.items():
            lines.append(f"| {name} | {budgets[name]} | {batching} | {r['tokens_per_s']:,.0f} | "
                         f"{r['tokens_per_s'] / base:.2f}x | {100 * r['padding']:.1f}% | {r['tokens_per_step']:,.0f} | "
                         f"{r['step_ms']:.0f} ({r['host_ms']:.1f}) |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--steps", type=int, default=2, help="steps per block (default %(default)s)")
    p.add_argument("--blocks", type=int, default=4, help="timed blocks per batching (default %(default)s)")
    p.add_argument("--budget", type=int, default=2048, help="positions per step for K = 32 (x2 for K = 256; "
                   "default %(default)s)")
    p.add_argument("--only", default=None, help="one distribution by name")
    p.add_argument("--markdown", default=None, help="append the results to this file")
    p.add_argument("--plans-only", action="store_true", help="padding of the plans only, no training (seconds)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plans_only:
        print("| lengths | mean tokens | budget | " + " | ".join(("packed", "packed 4S", "bucketed", "padded")) + " |")
        print("|---|---|---|---|---|---|---|")
        for dist in distributions():
            budget = args.budget * (1 if dist.max_tokens <= 32 else 2)
            padding = plan_padding(dist, budget)
            mean = sum(n * p for n, p in dist.lengths.items())
            print(f"| {dist.name} | {mean:.1f} | {budget} | " + " | ".join(f"{100 * v:.1f}%" for v in padding.values())
                  + " |")
        return 0
    torch.manual_seed(0)
    results, budgets = {}, {}
    for dist in distributions():
        if args.only and dist.name != args.only:
            continue
        budgets[dist.name] = args.budget * (1 if dist.max_tokens <= 32 else 2)
        results[dist.name] = measure(dist, budgets[dist.name], args.steps, args.blocks)
        print("\n".join(table_lines({dist.name: results[dist.name]}, budgets)[2:]), flush=True)
    lines = table_lines(results, budgets)
    print("\n".join(lines))
    if args.markdown:
        command = "python -m benchmarks.bench_batching " + " ".join(argv if argv is not None else [])
        header = (f"\n### Token-budget batching: packed vs bucketed vs padded ({datetime.date.today()})\n\n"
                  f"`{command.strip()}` on {cpu_name()}, {torch.get_num_threads()} thread(s), fp32, "
                  f"{args.blocks} blocks of {args.steps} steps per batching, interleaved.\n\n")
        with open(args.markdown, "a") as f:
            f.write(header + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
