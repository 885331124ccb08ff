"""`pipelines.ray_logging`: what Ray prints. Known-harmless warnings dropped by the start of their
message, never errors; Ray Data's own config loader reads our YAML and puts its console at WARNING;
a job on a small corpus prints its summary and a few lines, with stdout not a terminal."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines import ray_logging
from pipelines.ray_logging import (
    HARMLESS_RAY_DATA_WARNINGS,
    DropTraceback,
    DropWarnings,
    HarmlessAuthFilter,
    HarmlessRayDataFilter,
)

ROOT = Path(__file__).resolve().parents[2]


def _record(level: int, msg: str, name: str = "ray.data") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


@pytest.mark.parametrize("message", HARMLESS_RAY_DATA_WARNINGS)
def test_ray_data_advice_warnings_are_dropped_but_the_same_text_as_an_error_is_kept(message):
    f = HarmlessRayDataFilter()
    assert not f.filter(_record(logging.WARNING, message + " To enable, set ..."))
    assert not f.filter(_record(logging.INFO, message))
    assert f.filter(_record(logging.ERROR, message))


@given(st.text(max_size=60))
def test_only_listed_prefixes_are_dropped(text):
    f = DropWarnings(("Known harmless",))
    assert f.filter(_record(logging.WARNING, text)) == (not text.startswith("Known harmless"))


def test_the_auth_filter_keeps_the_warning_that_authentication_is_off():
    f = HarmlessAuthFilter()
    assert not f.filter(_record(logging.WARNING, "Token authentication is enabled for this Ray cluster. Set ..."))
    assert f.filter(_record(logging.WARNING, "Token authentication is disabled for this Ray cluster. Anyone ..."))


def test_ray_data_reads_our_config_console_at_warning_file_at_debug(monkeypatch):
    """Ray Data's own loader (what every Ray process runs on `import ray.data`) takes the YAML."""
    from ray.data._internal import logging as rd_logging

    monkeypatch.setenv(ray_logging.RAY_DATA_LOGGING_ENV, str(ray_logging.RAY_DATA_LOGGING_FILE))
    logger = logging.getLogger("ray.data")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        rd_logging.configure_logging()
        console = [h for h in logger.handlers if h.name == "console"]
        files = [h for h in logger.handlers if h.name == "file"]
        assert len(console) == 1 and console[0].level == logging.WARNING
        assert any(isinstance(f, HarmlessRayDataFilter) for f in console[0].filters)
        assert len(files) == 1 and files[0].level == logging.NOTSET and logger.level == logging.DEBUG
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        monkeypatch.delenv(ray_logging.RAY_DATA_LOGGING_ENV)
        rd_logging.configure_logging()


def test_ray_trains_path_named_logger_is_quieted_in_workers():
    """Ray Train 2.60 logs 'Reporting training result' through logging.getLogger(__file__)."""
    import importlib.util

    origin = importlib.util.find_spec(ray_logging.TRAIN_CONTEXT_MODULE).origin
    source = Path(origin).read_text()
    assert "logging.getLogger(__file__)" in source  # if Ray fixes it, this tweak can go
    logger = logging.getLogger(origin)
    before = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        ray_logging.setup_worker()
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(before)


@pytest.mark.slow
def test_a_tokenize_job_off_a_terminal_prints_its_summary_and_a_few_lines(tmp_path, subprocess_env):
    """A standalone job (its own local Ray), stdout a pipe: the issue's 15-line progress block every
    10 s, the banners and advice warnings are gone; the summary is there; no traceback."""
    from pipelines.corpus import build_corpus

    corpus = build_corpus("fashion-mnist", tmp_path / "corpus", split="test", samples_per_shard=50, limit=100)
    env = subprocess_env({})
    env.pop("RAY_ADDRESS", None)
    env.pop(ray_logging.RAY_DATA_LOGGING_ENV, None)  # as a user's shell has it
    cmd = [sys.executable, "-m", "jobs.tokenize", "--input", str(tmp_path / "corpus"), "--output",
           str(tmp_path / "tokens"), "--batch-size", "16"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-3000:]
    assert f"rows     {corpus['num_samples']}" in proc.stdout  # the summary
    lines = printed.strip().splitlines()
    assert len(lines) <= 16, printed
    assert "Traceback" not in printed
    for noise in ("logging_progress", "Token authentication is enabled", "Started a local Ray instance",
                  "Execution plan", "Truncating long operator name"):
        assert noise not in printed, noise


def test_a_transient_warning_keeps_its_line_and_loses_its_traceback():
    f = DropTraceback(("Failed to send resource request for",))
    try:
        raise TimeoutError("slow")
    except TimeoutError:
        warn = logging.LogRecord("x", logging.WARNING, __file__, 1, "Failed to send resource request for t", None,
                                 sys.exc_info())
        error = logging.LogRecord("x", logging.ERROR, __file__, 1, "Failed to send resource request for t", None,
                                  sys.exc_info())
    assert f.filter(warn) and warn.exc_info is None
    assert "Traceback" not in logging.Formatter().format(warn)
    assert f.filter(error) and error.exc_info is not None  # an error keeps its traceback


@pytest.mark.parametrize("interactive", [True, False])
def test_progress_is_one_live_bar_on_a_terminal_and_left_to_the_log_file_otherwise(interactive):
    from ray.data import DataContext
    from ray.data._internal.progress import get_progress_manager

    ctx = DataContext.get_current()
    fields = ("enable_operator_progress_bars", "enable_rich_progress_bars", "use_ray_tqdm",
              "enable_progress_bar_name_truncation", "enable_progress_bars")
    before = {f: getattr(ctx, f) for f in fields}
    try:
        ray_logging.configure_progress(interactive=interactive)
        assert ctx.enable_operator_progress_bars is False and ctx.enable_progress_bars is True
        assert (ctx.enable_rich_progress_bars, ctx.use_ray_tqdm) == ((True, False) if interactive else
                                                                      (before["enable_rich_progress_bars"],
                                                                       before["use_ray_tqdm"]))
        if interactive:  # what Ray Data builds from these settings when stdout is a terminal
            with mock.patch.object(sys.stdout, "isatty", return_value=True):
                manager = get_progress_manager(ctx, "ds", {}, False)
            assert type(manager).__name__ == "RichExecutionProgressManager"
    finally:
        for f, v in before.items():
            setattr(ctx, f, v)


def test_ray_datas_abort_report_of_an_os_error_is_left_to_the_jobs_one_line():
    """A stage that raised an OSError (full disk): Ray Data's error record with its traceback is dropped
    (the job says it in one line); any other error keeps its record, traceback and all."""
    from ray.exceptions import RayTaskError

    def record(error: BaseException) -> logging.LogRecord:
        message = (f'{ray_logging.RAY_DATA_ABORT} "MapBatches(write_pieces_batch)". Dataset execution will now '
                   "abort. To ignore this exception and continue, set DataContext.max_errored_blocks.")
        return logging.LogRecord("ray.data", logging.ERROR, __file__, 1, message, None, (type(error), error, None))

    full = OSError(28, "No space left on device")
    wrapped = RayTaskError("write_pieces_batch", "Traceback ...", full).as_instanceof_cause()
    keep = ray_logging.HarmlessRayDataFilter()
    assert not keep.filter(record(full)) and not keep.filter(record(wrapped))
    assert keep.filter(record(ZeroDivisionError("a bug")))
