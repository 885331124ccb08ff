"""Shared command-line plumbing: one-line errors instead of tracebacks, logging set-up."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from flextok.checkpoint import CheckpointError
from pipelines.ray_logging import DropWarnings, add_filter

# Library log lines that say nothing is wrong: (logger, message prefixes). Matplotlib announces that
# it builds its font cache (once, on a fresh install, when that takes over 5 s).
HARMLESS_LOG_LINES = (("matplotlib.font_manager", ("Matplotlib is building the font cache",)),)

# Errors a user can act on: printed as one line on stderr, exit status 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, CheckpointError)


def run_cli(
    prog: str, body: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
) -> int:
    """Parse `argv`, run `body(args)`, and turn user errors into `prog: error: <one line>`."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name, prefixes in HARMLESS_LOG_LINES:
        add_filter(logging.getLogger(name), DropWarnings(prefixes))
    try:
        return int(body(args) or 0)
    except USER_ERRORS as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def json_arg(text: str) -> dict:
    """argparse type for a JSON object (e.g. --storage-options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _float_in(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value:g}")
    return value


def positive_float(text: str) -> float:
    return _float_in(text, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    return _float_in(text, lambda v: v >= 0, "a number >= 0")


def probability(text: str) -> float:
    return _float_in(text, lambda v: 0 < v <= 1, "a number in (0, 1]")
