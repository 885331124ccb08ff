"""`flextok corpus {emoji,fashion-mnist} --out DIR`: write a demo WebDataset corpus from OS-installed data."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jobs.cli_util import int_in, positive_int, run_cli

log = logging.getLogger("jobs.corpus")


def build_parser() -> argparse.ArgumentParser:
    from pipelines.corpus import CORPORA, DEFAULT_SIZES, DEFAULT_SPLITS, MAX_SIZE, SPLITS

    p = argparse.ArgumentParser(
        prog="flextok corpus",
        description="Write a demo corpus of real images from the Debian packages as WebDataset tar shards "
        "(<key>.png, .cls label, .txt caption, .json metadata) plus dataset.json.",
    )
    p.add_argument("name", choices=CORPORA, help="emoji: 3,655 Noto colour emoji, caption = name, label = group "
                   "(9); fashion-mnist: 70,000 product photos, 10 classes")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--size", type=int_in(1, MAX_SIZE), default=None,
                   help=f"square image side in pixels (default: {DEFAULT_SIZES})")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="fashion-mnist: the standard train (60k) / test (10k) split; emoji: a fixed 90/10 split "
                   f"by name hash; all = both (default: {DEFAULT_SPLITS})")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000, help="samples per tar shard")
    p.add_argument("--limit", type=positive_int, default=None, help="write at most this many samples")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def _run(args: argparse.Namespace) -> int:
    from pipelines.corpus import build_corpus

    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out {args.out} exists and is not a folder")
    start = time.perf_counter()
    info = build_corpus(args.name, args.out, size=args.size, split=args.split,
                        samples_per_shard=args.samples_per_shard, limit=args.limit)
    print(
        f"{info['name']} ({info['split']}): {info['num_samples']} samples at {info['image_size']}px in "
        f"{info['num_shards']} shards under {args.out} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("flextok corpus", _run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
