"""`flextok export SRC --out FILE`: a trained model as a small, self-describing checkpoint to ship.

Casts the weights (fp16 by default: the shipped tiny models) and keeps every metadata entry of the
source (config, kind, tokenizer provenance, class names, training step), adding the source's sha256.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.cli_util import run_cli

log = logging.getLogger("jobs.export")

DTYPES = ("float16", "bfloat16", "float32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flextok export",
        description="Write a tokenizer or generator checkpoint with its weights cast to --dtype, keeping its "
        "config and provenance metadata (the form the models under flextok/assets/ ship in).",
    )
    p.add_argument("src", type=Path, help="a checkpoint file, or a run folder (its model.safetensors, else the "
                   "newest checkpoint's)")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="weight dtype (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def _run(args: argparse.Namespace) -> int:
    import torch

    from flextok.checkpoint import export_checkpoint, file_sha256, read_metadata
    from training.runs import latest_model_file

    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out} must be a .safetensors file")
    src = latest_model_file(args.src) if args.src.is_dir() else args.src
    if not src.is_file():
        raise FileNotFoundError(f"no checkpoint at {args.src}")
    if src.resolve() == args.out.resolve():
        raise ValueError("--out must differ from the source checkpoint")
    out = export_checkpoint(src, args.out, dtype=getattr(torch, args.dtype))
    kind = read_metadata(out).get("kind")
    size_mb = out.stat().st_size / 1e6
    print(f"export: {kind} {src} -> {out} ({args.dtype}, {size_mb:.1f} MB, sha256 {file_sha256(out)[:12]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("flextok export", _run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
