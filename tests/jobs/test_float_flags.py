"""Every number flag of every job refuses nan and inf in its parser, with one line: found by walking the
real parsers (subcommands included), so a flag added later with `type=float` fails here."""

import argparse
import importlib

import pytest

from jobs.cli import COMMANDS


def _float_flags(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(argv prefix, parser, flag) for each option whose type turns '0.5' into a float."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _float_flags(sub, (*prefix, name))
        elif action.option_strings and callable(action.type):
            try:
                value = action.type("0.5")
            except (argparse.ArgumentTypeError, TypeError, ValueError):
                continue
            if isinstance(value, float):
                yield prefix, action.option_strings[-1]


def _all_float_flags():
    for command, (module, _) in COMMANDS.items():
        parser = importlib.import_module(module).build_parser()
        for prefix, flag in _float_flags(parser):
            yield command, parser, prefix, flag


FLAGS = list(_all_float_flags())


def test_the_walk_finds_the_training_jobs_number_flags():
    found = {(command, flag) for command, _, _, flag in FLAGS}
    expected = {("train-tokenizer", f) for f in ("--lr", "--min-lr-ratio", "--weight-decay", "--grad-clip", "--ema-decay",
                                                  "--peak-tflops", "--cpus-per-worker", "--full-k-fraction",
                                                  "--uniform-time-fraction", "--noise-time-fraction", "--cond-dropout")}
    expected |= {("train-generator", f) for f in ("--lr", "--ema-decay", "--cond-dropout", "--grid-cfg")}
    expected |= {("evaluate", "--cfg-scale"), ("sample", "--top-p"), ("tokenize", "--gpus-per-actor")}
    assert expected <= found, expected - found


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_number_flag_refuses_non_finite_values_in_one_line(value, capsys):
    for command, parser, prefix, flag in FLAGS:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*prefix, f"{flag}={value}"])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2, (command, flag)
        assert f"error: argument {flag}: expected " in last and f"got {float(value):g}" in last, (command, flag, last)
