"""`flextok tokenize --input SRC --output DST`: tokenize an image corpus into Parquet token shards.

Runs on a laptop (a local Ray is started when RAY_ADDRESS is unset) and on a cluster:
`ray job submit --working-dir . -- python -m jobs.tokenize --input s3://... --output s3://...`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from flextok.precision import PRECISIONS
from jobs.cli_util import json_arg, non_negative_float, positive_float, positive_int, run_cli

log = logging.getLogger("jobs.tokenize")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flextok tokenize",
        description="Tokenize an image corpus with Ray Data into Parquet token shards: DST/part-*.parquet "
        "(key, tokens list<uint16>, num_tokens, label, caption, source, width, height), DST/_errors/ "
        "(one row per sample that could not be tokenized) and DST/_manifest.json. Re-running the same "
        "command finishes an interrupted run; on a finished DST it does nothing.",
    )
    p.add_argument("--input", required=True, metavar="SRC",
                   help="fsspec URL (local path, file://, s3://) of a folder, a glob or a brace pattern "
                   "(shard-{000..099}.tar): WebDataset tar shards, image folders (class sub-folders = labels) "
                   "or Parquet with an image-bytes column (Hugging Face `image.bytes`)")
    p.add_argument("--output", required=True, metavar="DST", help="fsspec URL of the output folder")
    p.add_argument("--model", default=None, metavar="CKPT",
                   help="tokenizer: a checkpoint of ours (a path, or a file or run folder at any fsspec URL such as "
                   "s3://...: fetched once per node, checked by sha256), an official FlexTok release folder, or "
                   "a preset name (tiny, d12_d12, ...; RANDOM weights, for tests). Default: the bundled tiny tokenizer")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="K",
                   help="store the first K tokens of each image (1..model K; default all)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="images per encoder call")
    p.add_argument("--actors", type=positive_int, default=None, metavar="N",
                   help="encoder actors the job wants (default: one per GPU up; on CPU one per CPU). "
                   "On an autoscaling cluster with fewer GPUs up, the pool starts with what is up (at least "
                   "one actor, waiting for the first GPU node) and grows to N as the autoscaler adds nodes")
    p.add_argument("--gpus-per-actor", type=non_negative_float, default=None, metavar="F",
                   help="GPUs per encoder actor (default 1 when the cluster has GPUs; 0 forces CPU). Given on a "
                   "cluster with no GPU node up yet, the job waits for the autoscaler to add one")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where the encoder actors compute. Default: CUDA on actors that hold a GPU (an error "
                   "if their CUDA is unavailable, never a silent CPU run), CPU otherwise; 'cpu' on GPU actors "
                   "tokenizes on CPU on purpose (e.g. fake-GPU test nodes)")
    p.add_argument("--cpus-per-actor", type=positive_float, default=None, metavar="F",
                   help="CPUs reserved per encoder actor; its torch threads are this rounded up (and without "
                   "--actors, actors on half the CPUs). Default on CPU: one 1-thread actor per CPU, the pool "
                   "reserving at most half the CPUs (the rest are decode task slots; the OS shares the cores "
                   "between the stages that have work), less on a multi-node cluster so that losing a node "
                   "never leaves the decode tasks without a CPU")
    p.add_argument("--storage-options", type=json_arg, default=None, metavar="JSON",
                   help='fsspec storage options for s3:// etc., e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' '
                   "(default: the standard AWS_* environment variables); never logged or stored")
    p.add_argument("--files-per-shard", type=positive_int, default=1000,
                   help="image folders: files per input shard (the unit of resume)")
    p.add_argument("--max-pixels", type=positive_int, default=None,
                   help="refuse images with more pixels than this before decoding (default 100,000,000)")
    p.add_argument("--min-side", type=positive_int, default=None,
                   help="refuse images whose shorter side is below this (default 8)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="encoder compute precision: fp32 (TF32 off; tokens independent of the hardware), tf32, or "
                        "bf16/fp16 autocast (faster on GPUs; on the shipped tokenizer bf16 changes ~2%% of tokens, "
                        "fp16 ~0.2%%); recorded, and a re-run must use the same (default %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder's transformer blocks in each actor (eager where unavailable)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="decode JPEGs in batches on the encoder actors' GPUs (nvJPEG; needs the 'gpu' extra) instead "
                        "of on CPU tasks; other formats, rotated and broken files still decode on CPU")
    p.add_argument("--io-attempts", type=positive_int, default=8, metavar="N",
                   help="tries per storage operation through transient faults (resets, timeouts, throttling, "
                   "5xx), with exponential backoff from 1 s; a shard still failing is left unfinished for a "
                   "re-run, never recorded as bad data (default 8, about two minutes)")
    g = p.add_argument_group(
        "adaptive length (per image, the shortest prefix whose one-step reconstruction meets a target; "
        "rows gain chosen_num_tokens, reconstruction_mse and full_reconstruction_mse)")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--adaptive-relative-error", type=non_negative_float, default=None, metavar="R",
                        help="prefix MSE at most (1 + R) x the MSE of all K tokens (0.2: within 20%%)")
    target.add_argument("--adaptive-max-mse", type=non_negative_float, default=None, metavar="E",
                        help="prefix MSE at most E (latent space; images in [-1, 1] without a VAE); an image "
                        "that misses it even at K keeps all K tokens and is counted in the manifest")
    g.add_argument("--adaptive-lengths", type=_lengths_arg, default=None, metavar="all|pow2|K1,K2,..",
                   help="candidate prefix lengths (K is always one). Each costs one decoder row per image: "
                   "'all' (default) is K decoder rows, pow2 (1, 2, 4, .., K) log2(K) + 1")
    g.add_argument("--adaptive-keep-all", action="store_true",
                   help="store all K tokens and record the chosen length only (chosen_num_tokens)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def _lengths_arg(text: str) -> str | tuple[int, ...]:
    if text in ("all", "pow2"):
        return text
    try:
        lengths = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all, pow2 or comma-separated lengths, got {text!r}") from None
    if not lengths or min(lengths) < 1 or list(lengths) != sorted(set(lengths)):
        raise argparse.ArgumentTypeError(f"lengths must be ascending, distinct and >= 1, got {text!r}")
    return lengths


def length_target(args: argparse.Namespace):
    """The `flextok.adaptive.LengthTarget` the adaptive flags ask for, or None."""
    from flextok.adaptive import LengthTarget

    if args.adaptive_relative_error is None and args.adaptive_max_mse is None:
        if args.adaptive_lengths is not None or args.adaptive_keep_all:
            raise ValueError("--adaptive-lengths / --adaptive-keep-all need --adaptive-relative-error or --adaptive-max-mse")
        return None
    candidates = None if args.adaptive_lengths == "all" else args.adaptive_lengths
    return LengthTarget(max_relative_error=args.adaptive_relative_error, max_error=args.adaptive_max_mse,
                        candidates=candidates)


def _run(args: argparse.Namespace) -> int:
    from pipelines.decode import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
    from pipelines.tokenize import IncompleteRunError, TokenizeConfig, run_tokenize

    cfg = TokenizeConfig(
        input=args.input,
        output=args.output,
        model=args.model,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        num_actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        storage_options=args.storage_options or {},
        files_per_shard=args.files_per_shard,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        min_side=args.min_side or DEFAULT_MIN_SIDE,
        precision=args.precision,
        compile=args.compile,
        gpu_decode=args.gpu_decode,
        io_attempts=args.io_attempts,
        device=args.device,
        length_target=length_target(args),
        keep_all_tokens=args.adaptive_keep_all,
    )
    try:
        result = run_tokenize(cfg)
    except IncompleteRunError as e:  # not a user error, but still one line: the remedy is to re-run
        print(f"flextok tokenize: incomplete: {e}", file=sys.stderr)
        return 1
    print(result.summary(), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("flextok tokenize", _run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
