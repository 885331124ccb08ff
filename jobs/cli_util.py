"""Shared command-line plumbing: one-line errors instead of tracebacks, logging set-up."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence

from flextok.checkpoint import CheckpointError
from pipelines.ray_logging import DropWarnings, add_filter

# Library log lines that say nothing is wrong: (logger, message prefixes). Matplotlib announces that
# it builds its font cache (once, on a fresh install, when that takes over 5 s).
HARMLESS_LOG_LINES = (("matplotlib.font_manager", ("Matplotlib is building the font cache",)),)

# Ray Data appends this advice to the message of any error raised in a stage (Ray 2.60:
# ray.data._internal.util._annotate_exception_with_retry_context); the cause is what comes before it.
RAY_DATA_RETRY_NOTE = re.compile(r"\s*Failed to [^\n]* after \d+/\d+ attempts \(total backoff [\d.]+s\)\..*\Z", re.S)

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
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        cause = root_cause(e)
        if isinstance(cause, USER_ERRORS):
            status = 2
        elif isinstance(cause, OSError) or type(cause).__module__.startswith("botocore"):
            status = 1  # the environment (disk full or read-only, storage or cluster unreachable)
        else:
            raise
        print(f"{prog}: error: {one_line(cause)}", file=sys.stderr)
        return status


def root_cause(e: BaseException) -> BaseException:
    """The user's or the environment's exception inside Ray's wrappers (a task error carries the
    original as `.cause`; Ray Data chains it as `__cause__`; Ray Train's worker-group error holds each
    worker's as `worker_failures`, the lowest rank's is taken), else `e` itself."""
    seen: set[int] = set()
    while type(e).__module__.startswith("ray.") and id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None) or {}
        inner = getattr(e, "cause", None) or e.__cause__ or (failures[min(failures)] if failures else None)
        if inner is None:
            break
        e = inner
    return e


def one_line(e: BaseException) -> str:
    """`e` as one line: an OSError by its cause and file ('No space left on device: /data/x');
    URLs quoted in it are redacted."""
    from pipelines.storage import redact_text

    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.strerror}: {e.filename}"
    else:
        text = str(e) if isinstance(e, USER_ERRORS + (OSError,)) else f"{type(e).__name__}: {e}"
    text = RAY_DATA_RETRY_NOTE.sub("", text)
    return redact_text(" ".join(text.split())) or type(e).__name__


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
    if not math.isfinite(value) or not ok(value):  # nan and inf pass float() but no setting takes them
        raise argparse.ArgumentTypeError(f"expected {what}, got {value:g}")
    return value


def finite_float(text: str) -> float:
    return _float_in(text, lambda v: True, "a finite number")


def int_in(low: int, high: int):
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        value = _int_at_least(text, low, f"an integer in {low}..{high}")
        if value > high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    return _float_in(text, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    return _float_in(text, lambda v: v >= 0, "a number >= 0")


def probability(text: str) -> float:
    return _float_in(text, lambda v: 0 < v <= 1, "a number in (0, 1]")
