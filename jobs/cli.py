"""The `flextok` console script: one subcommand per job module (`flextok tokenize` = `python -m jobs.tokenize`)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": ("jobs.corpus", "write a demo WebDataset corpus from OS-installed real data"),
    "tokenize": ("jobs.tokenize", "tokenize an image corpus into Parquet token shards (Ray Data)"),
    "train-tokenizer": ("jobs.train_tokenizer", "train a FlexTok tokenizer (Ray Train)"),
    "train-generator": ("jobs.train_generator", "train a class- or text-conditional generator (Ray Train)"),
    "sample": ("jobs.sample", "sample images from a generator"),
    "evaluate": ("jobs.evaluate", "evaluate a tokenizer (PSNR vs k) or a generator (FID, accuracy)"),
    "export": ("jobs.export", "write a trained model as a small checkpoint to ship (fp16 by default)"),
    "quickstart": ("jobs.quickstart", "build a demo corpus, tokenize, train briefly, sample, report"),
}


def _usage() -> str:
    lines = ["usage: flextok <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`flextok <command> --help` explains every option."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flextok: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
