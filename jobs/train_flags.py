"""The command-line flags both training jobs share, and `TrainConfig` from them (`training.settings`)."""

from __future__ import annotations

import argparse

from jobs.cli_util import finite_float, json_arg, positive_float, positive_int
from training.settings import STRATEGIES, TrainConfig


def add_train_args(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The flags both training jobs share; defaults from `defaults`."""
    d = defaults
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=positive_int, default=d.max_steps, help="optimizer steps in all (default %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="global batch size, split evenly over the workers (default %(default)s)")
    g.add_argument("--lr", type=finite_float, default=d.lr, help="peak learning rate of AdamW (default %(default)s)")
    g.add_argument("--min-lr-ratio", type=finite_float, default=d.min_lr_ratio,
                   help="cosine decay ends at lr * this (default %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps, at most half of --max-steps (default %(default)s)")
    g.add_argument("--weight-decay", type=finite_float, default=d.weight_decay,
                   help="AdamW weight decay on matrices, not on biases/norms (default %(default)s)")
    g.add_argument("--grad-clip", type=finite_float, default=d.grad_clip, help="max global grad norm, 0 = off (default %(default)s)")
    g.add_argument("--ema-decay", type=finite_float, default=d.ema_decay, help="EMA of the weights (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of init, noise and shuffling (default %(default)s)")
    g.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer,
                   help="rows in each worker's shuffle window, drawn from >= 16 pieces of the whole corpus; "
                   "0 = pieces in their (shuffled) epoch order; a resume keeps it (default %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every,
                   help="steps between checkpoints, also written at the end (default %(default)s)")
    g.add_argument("--checkpoint-minutes", type=finite_float, default=d.checkpoint_minutes,
                   help="also a checkpoint once this many minutes have passed since the last one (decided by "
                   "worker 0 at a --log-every step and shared with all workers; default: steps only)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints,
                   help="newest checkpoints kept in RUN (default %(default)s)")
    g.add_argument("--log-every", type=positive_int, default=d.log_every, help="steps between progress lines (default %(default)s)")
    g.add_argument("--grid-every", type=int, default=d.grid_every,
                   help="steps between image grids under RUN/grids, 0 = only at the end (default %(default)s)")
    g.add_argument("--max-failures", type=int, default=d.max_failures,
                   help="worker failures to recover from (from the last checkpoint) before giving up; -1 = retry "
                   "forever (spot clusters); user errors fail at once (default %(default)s)")
    g.add_argument("--storage-options", type=json_arg, default=None,
                   help="fsspec options (JSON) for s3:// data and RUN; AWS_* variables are used otherwise")
    g.add_argument("--quiet", action="store_true", help="log warnings only")
    g = p.add_argument_group("resources")
    g.add_argument("--workers", type=positive_int, default=d.num_workers, help="Ray Train workers (default %(default)s)")
    g.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="ddp: every worker holds the whole model; fsdp: FSDP2 shards parameters, gradients, AdamW "
                   "and EMA over the workers, checkpoints are written by every worker (default %(default)s)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block's activations in the backward pass (less memory, ~1/3 more compute)")
    g.add_argument("--grad-accum", type=positive_int, default=d.grad_accum,
                   help="micro-batches per optimizer step: each worker runs --batch-size / workers / this rows at "
                   "a time (default %(default)s)")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--peak-tflops", type=positive_float, default=None,
                   help="dense bf16 peak of one device, for the MFU in logs and TensorBoard (default: known for "
                   "A100, H100, H200, L4; none on CPUs)")
    g.add_argument("--gpus", action="store_true", help="one GPU per worker (nccl, bf16 autocast); default CPU (gloo, fp32)")
    g.add_argument("--cpus-per-worker", type=finite_float, default=None,
                   help="CPUs reserved per worker (default: 1, less when the cluster must keep a CPU for data)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per worker (default: the node's CPUs shared by the workers)")


def add_token_budget_args(p: argparse.ArgumentParser) -> None:
    """Token-budget batches (generators of variable-length rows)."""
    from training.batching import BATCHINGS

    g = p.add_argument_group("token-budget batches")
    g.add_argument("--token-budget", type=positive_int, default=None, metavar="N",
                   help="fill each optimizer step with N sequence positions over all workers (split like "
                   "--batch-size) instead of --batch-size rows: variable-length rows cost what they hold")
    g.add_argument("--batching", choices=BATCHINGS, default=None,
                   help="how a --token-budget is spent: bucketed (rows of similar length padded together; the "
                   "default, the fastest measured: BENCHMARKS.md), packed (several sequences per row, attention "
                   "never crossing one; rows of --pack-length) or padded (rows in stream order, padded to the longest)")
    g.add_argument("--pack-length", type=positive_int, default=None, metavar="S",
                   help="positions per packed row (default: the longest sequence, condition + K tokens); longer "
                   "rows leave less room unfilled, at the cost of attention over longer rows")


def add_val_args(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    p.add_argument(flag, default=None, metavar="SRC",
                   help=f"held-out {what}: the EMA model's loss on them (fixed noise) is logged at every checkpoint")
    p.add_argument("--val-items", type=positive_int, default=512,
                   help="held-out rows used for the validation loss (default %(default)s)")


def add_init_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--init", default=None, metavar="CKPT",
                   help=f"fine-tune: start from this {what} checkpoint: a file or a run or release folder, local or at "
                   "any fsspec URL (s3://...: fetched once per node, checked by sha256); its config is the "
                   "architecture, so architecture flags are refused")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes, keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every, grid_every=args.grid_every, seed=args.seed, num_workers=args.workers,
        use_gpu=args.gpus, cpus_per_worker=args.cpus_per_worker, threads=args.threads,
        max_failures=args.max_failures, shuffle_buffer=args.shuffle_buffer, strategy=args.strategy,
        activation_checkpointing=args.activation_checkpointing, grad_accum=args.grad_accum, compile=args.compile,
        peak_tflops=args.peak_tflops, token_budget=getattr(args, "token_budget", None),
        batching=getattr(args, "batching", None), pack_length=getattr(args, "pack_length", None),
    )
