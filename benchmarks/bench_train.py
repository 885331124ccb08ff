"""Training throughput: Ray Train steps fed by the training row stream vs a bare loop over tensors in memory.

One Ray Train worker (a `TorchTrainer`) trains the tokenizer with `training.trainer.Trainer` (AdamW,
EMA, clipping) and alternates blocks of steps between two sources of the same real images:
  - ray:    the worker's row stream exactly as `flextok train-tokenizer` reads it (WebDataset shards
            through the pipeline's read and decode stages in reader threads, shuffle windows, the
            Arrow collate in a prefetch thread), so any ingestion stall is inside the timing;
  - memory: batches sliced from a uint8 tensor already in the worker's memory (a bare PyTorch loop:
            no Ray between steps).
Blocks alternate ray, memory, memory, ray, ... in one process with the same model, threads and step
function, so the load of a shared machine (which swings throughput 2-4x here from minute to minute)
hits both sides alike; running the two sides one after the other in separate processes does not
give a usable ratio on such a machine.

    python -m benchmarks.bench_train                         # tiny tokenizer, batch 64
    python -m benchmarks.bench_train --threads 1 --markdown BENCHMARKS.md

`--strategies`: FSDP vs DDP step time on `--workers` Ray Train workers (gloo on CPU), side by side in
one run. Every worker builds both trainers of the same generator (the `--gpt` preset, class-
conditional, full-length rows of random ids held in memory, so only the strategies differ) in one
process group and alternates timed blocks ddp, fsdp, fsdp, ddp, ...; tokens/s counts all workers.

    python -m benchmarks.bench_train --strategies --workers 2 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def decoded_pixels(corpus: Path, image_size: int) -> torch.Tensor:
    """Every image of the corpus as uint8 (N, H, W, 3), via the pipeline's reader and decoder."""
    from pipelines.decode import decode_batch
    from pipelines.encode import pixels_to_array
    from pipelines.sources import read_shard, resolve_inputs

    arrays = []
    for shard in resolve_inputs(str(corpus)).shards:
        table = decode_batch(pa.concat_tables(list(read_shard(shard))), image_size=image_size)
        table = table.filter(pc.and_(pc.is_null(table["error"]), pc.greater_equal(table["index"], 0)))
        arrays.append(torch.from_numpy(pixels_to_array(table["pixels"], image_size).copy()))
    return torch.cat(arrays)


def memory_batches(pixels: torch.Tensor, batch_size: int):
    """Endless batches sliced from tensors in memory, reshuffled every epoch."""
    g = torch.Generator().manual_seed(0)
    while True:
        order = torch.randperm(len(pixels), generator=g)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield {"pixels": pixels[order[start : start + batch_size]]}  # (B, H, W, 3) uint8


def interleaved_loop(config: dict[str, Any]) -> dict[str, float]:
    """Ray Train worker: alternate timed blocks of steps fed by Ray Data and by memory."""
    from training.data import RowStream, batch_stream
    from training.trainer import Trainer

    task, cfg = config["task"], config["cfg"]
    torch.set_num_threads(config["threads"])
    device = torch.device("cpu")
    trainer = Trainer(task, cfg, device)
    stream = RowStream(config["source"], seed=0, rank=0, world_size=1, window_rows=cfg.shuffle_buffer)
    sources = {
        "ray": (batch for batch, _ in batch_stream(stream, task.collate_fn(), cfg.batch_size)),
        "memory": memory_batches(config["pixels"], cfg.batch_size),
    }
    for _ in range(config["warmup"]):  # data pipeline start-up and allocator warm-up, untimed
        for source in sources.values():
            trainer.train_step(task.prepare_batch(next(source), device))
    seconds = {name: 0.0 for name in sources}
    for r in range(config["rounds"]):
        order = ["ray", "memory"] if r % 2 == 0 else ["memory", "ray"]  # ABBA: no side always goes first
        for name in order:
            start = time.perf_counter()
            for _ in range(config["block"]):
                trainer.train_step(task.prepare_batch(next(sources[name]), device))
            seconds[name] += time.perf_counter() - start
    images = config["rounds"] * config["block"] * cfg.batch_size
    return {name: images / s for name, s in seconds.items()}


def strategies_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: one DDP and one FSDP trainer of the same model, timed blocks alternating ABBA."""
    import ray.train
    import ray.train.torch

    from training.trainer import Trainer

    task, cfg = config["task"], config["cfg"]
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cpu")
    trainers = {
        "ddp": Trainer(task, cfg.replace(strategy="ddp"), device, is_main=rank == 0,
                       wrap=lambda m: ray.train.torch.prepare_model(m)),
        "fsdp": Trainer(task, cfg.replace(strategy="fsdp"), device, is_main=rank == 0),
    }
    assert trainers["fsdp"].sharded and not trainers["ddp"].sharded, "fsdp must shard, ddp must not"
    g = torch.Generator().manual_seed(rank)
    rows, c = cfg.worker_batch_size, task.config
    labels = torch.randint(0, c.num_classes, (rows,), generator=g)
    batch = task.prepare_batch({"tokens": torch.randint(0, c.codebook_size, (rows, c.max_tokens), generator=g),
                                "lengths": torch.full((rows,), c.max_tokens), "label": labels}, device)
    for trainer in trainers.values():  # allocator and first-call warm-up, untimed
        for _ in range(config["warmup"]):
            trainer.train_step(batch)
    seconds = {name: 0.0 for name in trainers}
    for r in range(config["rounds"]):
        for name in (["ddp", "fsdp"] if r % 2 == 0 else ["fsdp", "ddp"]):
            torch.distributed.barrier()  # every block starts together on every worker
            start = time.perf_counter()
            for _ in range(config["block"]):
                loss, _, _ = trainers[name].train_step(batch)
            loss.item()  # the block's work is done (no-op on CPU, a sync on GPUs)
            seconds[name] += time.perf_counter() - start
    steps = config["rounds"] * config["block"]
    tokens = steps * rows * c.max_tokens * world
    return {name: {"tokens_per_second": tokens / s, "step_ms": 1000 * s / steps} for name, s in seconds.items()}


def run_strategies(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    import ray
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from benchmarks.bench_train import (
        strategies_loop as loop,  # by reference: workers import it (PYTHONPATH)
    )
    from flextok.gpt import GPTConfig
    from pipelines.cluster import ensure_ray
    from training.settings import TrainConfig
    from training.tasks import GeneratorTask

    task = GeneratorTask(config=GPTConfig.from_preset(args.gpt), tokenizer_id="bench", tokenizer_sha256=None)
    cfg = TrainConfig(batch_size=args.batch_size, num_workers=args.workers, max_steps=10**6, warmup_steps=10,
                      grid_every=0)
    with tempfile.TemporaryDirectory(prefix="bench-strategies-") as tmp:
        started = ensure_ray()
        try:
            rates = TorchTrainer(
                loop,
                train_loop_config={"task": task, "cfg": cfg, "threads": args.threads, "warmup": args.warmup,
                                   "rounds": args.rounds, "block": args.block},
                scaling_config=ray.train.ScalingConfig(num_workers=args.workers,
                                                       resources_per_worker={"CPU": 1 / args.workers}),
                run_config=ray.train.RunConfig(name="bench", storage_path=str(Path(tmp) / "runs")),
                torch_config=TorchConfig(backend="gloo"),
            ).fit().return_value
        finally:
            if started:
                ray.shutdown()
    params = sum(p.numel() for p in task.build_model(torch.device("meta")).parameters())
    return rates, params


def strategies_section(args: argparse.Namespace, argv: list[str] | None, rates: dict[str, Any], params: int,
                       load: tuple[str, str]) -> str:
    from flextok.gpt import GPTConfig

    c = GPTConfig.from_preset(args.gpt)
    command = "python -m benchmarks.bench_train " + " ".join(argv if argv is not None else sys.argv[1:])
    ratio = rates["fsdp"]["tokens_per_second"] / rates["ddp"]["tokens_per_second"]
    return "\n".join([
        "",
        f"- Command: `{command.strip()}`",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}, {args.workers} Ray Train "
        f"workers (gloo) x {args.threads} torch thread(s), fp32. Date: "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- `uptime` at the start: `{load[0]}`; at the end: `{load[1]}` (other engineers' jobs share the cores)",
        f"- `{args.gpt}` class-conditional generator (depth {c.depth}, width {c.dim}, vocab {c.vocab_size}, "
        f"{c.max_tokens} tokens, {params / 1e6:.2f} M parameters), global batch {args.batch_size} full-length rows "
        f"held in memory; {args.rounds * args.block} timed steps per strategy in blocks of {args.block} "
        f"(ddp, fsdp, fsdp, ddp, ...; after {args.warmup} untimed steps each)",
        "",
        "| strategy | step (ms) | tokens/s (all workers) |",
        "|---|---|---|",
        *(f"| {name} | {rates[name]['step_ms']:.0f} | {rates[name]['tokens_per_second']:.0f} |" for name in ("ddp", "fsdp")),
        f"| **fsdp / ddp** | | **{ratio:.3f}x** |",
        "",
    ])


def run(args: argparse.Namespace) -> tuple[dict[str, float], int, int]:
    import ray
    import ray.cloudpickle
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    from flextok.config import get_preset
    from pipelines.cluster import ensure_ray
    from pipelines.corpus import build_corpus
    from pipelines.sources import resolve_inputs
    from training.data import image_source
    from training.settings import TrainConfig
    from training.tasks import TokenizerTask

    if __name__ != "__main__":  # imported: let workers unpickle the loop without importing benchmarks/
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    task = TokenizerTask(config=get_preset(args.preset), preset=args.preset)
    cfg = TrainConfig(batch_size=args.batch_size, max_steps=10**6, warmup_steps=10, grid_every=0)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        corpus = Path(args.data) if args.data else Path(tmp) / "corpus"
        if not args.data:
            build_corpus("fashion-mnist", corpus, limit=args.images, samples_per_shard=256)
        pixels = decoded_pixels(corpus, task.config.image_size)
        started = ensure_ray()
        try:
            DataContext.get_current().enable_progress_bars = False
            trainer = TorchTrainer(
                interleaved_loop,
                train_loop_config={"task": task, "cfg": cfg, "pixels": pixels, "threads": args.threads,
                                   "source": image_source(resolve_inputs(str(corpus)), {}, task.config.image_size),
                                   "warmup": args.warmup, "rounds": args.rounds, "block": args.block},
                scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=ray.train.RunConfig(name="bench", storage_path=str(Path(tmp) / "runs")),
            )
            rates = trainer.fit().return_value
        finally:
            if started:
                ray.shutdown()
    params = sum(p.numel() for p in task.build_model(torch.device("meta")).parameters())
    return rates, len(pixels), params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="an image corpus (default: Fashion-MNIST, --images of it)")
    parser.add_argument("--images", type=int, default=2048, help="corpus size when built here (default %(default)s)")
    parser.add_argument("--preset", default="tiny", help="tokenizer preset (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="blocks per side (default %(default)s)")
    parser.add_argument("--block", type=int, default=8, help="steps per block (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per side first (default %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--markdown", default=None, help="append the result section to this file")
    parser.add_argument("--strategies", action="store_true", help="FSDP vs DDP step time instead (see above)")
    parser.add_argument("--workers", type=int, default=2, help="--strategies: Ray Train workers (default %(default)s)")
    parser.add_argument("--gpt", default="tiny", help="--strategies: generator preset (default %(default)s)")
    args = parser.parse_args(argv)
    if args.strategies:
        import subprocess

        start_load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        rates, params = run_strategies(args)
        section = strategies_section(args, argv, rates, params,
                                     (start_load, subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()))
        print(section)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(section)
        return 0

    load_at_start = os.getloadavg()[0]
    rates, num_images, params = run(args)
    ratio = rates["ray"] / rates["memory"]
    print(f"ray: {rates['ray']:.1f} images/s, memory: {rates['memory']:.1f} images/s, ratio {ratio:.3f}")
    from flextok.config import get_preset

    c = get_preset(args.preset)
    command = "python -m benchmarks.bench_train " + " ".join(argv if argv is not None else sys.argv[1:])
    steps = args.rounds * args.block
    section = "\n".join([
        "",
        f"- Command: `{command.strip()}`",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}, {args.threads} torch "
        f"thread(s), fp32; 1-min load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        f"end (other jobs share the cores). Date: {datetime.date.today().isoformat()}",
        f"- `{args.preset}` tokenizer ({c.image_size}px, patch {c.patch_size}, K={c.num_registers}, width "
        f"{c.encoder_dim}/{c.decoder_dim}, depth {c.encoder_depth}+{c.decoder_depth}, {params / 1e6:.2f} M), batch "
        f"{args.batch_size}, {num_images} Fashion-MNIST images; {steps} timed steps per side in blocks of "
        f"{args.block} (after {args.warmup} untimed steps each)",
        "",
        "| source of the batches | images/s |",
        "|---|---|",
        f"| Ray Data shard in a Ray Train worker (the job's ingestion) | {rates['ray']:.1f} |",
        f"| tensors already in memory (bare loop), same worker | {rates['memory']:.1f} |",
        f"| **Ray / bare** | **{ratio:.3f}x** (target >= 0.9x) |",
        "",
    ])
    print(section)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
