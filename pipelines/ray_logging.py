"""What Ray prints: progress and log lines a person can read, nothing real hidden.

Owns the console side of the Ray a job starts or joins (`quiet_ray`, called by `ensure_ray` before
`ray.init`; a local Ray's GCS, raylet and workers inherit its environment):

- Ray Data's console shows warnings and errors only. Its INFO lines (execution plans, the progress
  block it logs every 10 s when stdout is not a terminal, "execution finished") still go to the
  session's `logs/ray-data/ray-data.log`, where Ray Data writes everything at DEBUG. Set through Ray
  Data's own `RAY_DATA_LOGGING_CONFIG` (`ray_data_logging.yaml` beside this module: Ray's default
  config, console at WARNING), which every process reads when it imports `ray.data`. A user's own
  setting wins.
- Progress: one live bar per dataset on a terminal (Ray Data's global bar, no per-operator bars);
  nothing on the console otherwise, where the job prints its summary.
- Known-harmless warnings, each matched by the start of its message, warnings only (never errors):
  Ray Data's advice that progress bars are off or an operator name was shortened; Ray's note that
  it turned token authentication on for a new local cluster (its opposite, "token authentication is
  disabled", stays); the deprecation warning Ray Train's own DatasetManager triggers inside Ray Data
  (`ExecutionOptions.exclude_resources`), which no user code can act on.
- Ray Data's report of a stage that raised an OSError (disk full or read-only, storage out of reach),
  with its traceback: the job's error line says it (`HarmlessRayDataFilter`).
- Ray Train's controller logs a full traceback with "Failed to send resource request ... safe to
  ignore if transient" when a busy machine delays its autoscaling coordinator: the line stays, the
  traceback goes (`TRACEBACK_FREE_WARNINGS`).
- Ray Train 2.60's worker context logs "Reporting training result ..." at INFO through a logger
  named after its file path (`logging.getLogger(__file__)`), so `LoggingConfig(log_level=...)`,
  which filters `ray.train.*`, misses it: that logger is set to WARNING in every local worker
  (`setup_worker`, Ray's `worker_process_setup_hook`).
- The driver's `ray` logger at WARNING: no "Started a local Ray instance" banner.

Does not own: the jobs' own log lines (`jobs.cli_util`), nor the C++ log lines of Ray's core worker:
one known-harmless line per Ray Data actor pool ("constructor arguments in the object store and
max_restarts > 0": Ray Data hands its map function to actors by reference) stays, because hiding it
needs RAY_BACKEND_LOG_LEVEL, which hides real errors too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings
from pathlib import Path

RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"  # read by ray.data._internal.logging
RAY_DATA_LOGGING_FILE = Path(__file__).with_name("ray_data_logging.yaml")
RAY_LOGGER_LEVEL = logging.WARNING
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
WORKER_SETUP_HOOK = f"{__name__}.setup_worker"

# Ray Data warnings that are advice, not trouble (Ray 2.60 wording).
HARMLESS_RAY_DATA_WARNINGS: tuple[str, ...] = (
    "Progress bars disabled.",  # a job switched them off on purpose
    "Progress bars for operators disabled.",  # likewise: one bar per dataset
    "Truncating long operator name",  # a name shortened to fit a progress bar
)
# Ray Data's error line when a stage raised: "... Dataset execution will now abort" (Ray 2.60 wording).
RAY_DATA_ABORT = "An exception was raised from a task of operator"
# Ray's note that it chose the secure default for a new local cluster.
HARMLESS_AUTH_WARNINGS: tuple[str, ...] = ("Token authentication is enabled for this Ray cluster.",)
# Python warnings raised inside Ray by Ray itself.
HARMLESS_PY_WARNINGS: tuple[str, ...] = ("`ExecutionOptions.exclude_resources` is deprecated",)
# Warnings Ray logs with a traceback though they say "safe to ignore if transient": the line stays, the
# traceback goes. Ray Train's controller asks its autoscaling coordinator for resources with a 5 s
# timeout, which a busy machine exceeds while the coordinator actor starts.
TRACEBACK_FREE_WARNINGS: dict[str, tuple[str, ...]] = {
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client":
        ("Failed to send resource request for",),
}
# Ray Train 2.60 names this module's logger by its file path (see the module docstring).
TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"


class DropWarnings(logging.Filter):
    """Drops warnings and lower (never errors) whose message starts with one of `prefixes`."""

    prefixes: tuple[str, ...] = ()

    def __init__(self, prefixes: tuple[str, ...] | None = None) -> None:
        super().__init__()
        if prefixes is not None:
            self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not record.getMessage().startswith(self.prefixes)


class HarmlessRayDataFilter(DropWarnings):
    """Ray Data's console handler (named in ray_data_logging.yaml). Also drops Ray Data's report of a
    stage that raised an OSError (a full or read-only disk, storage out of reach), traceback and all:
    the job's own error line names the cause and the path (`jobs.cli_util.run_cli`)."""

    prefixes = HARMLESS_RAY_DATA_WARNINGS

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith(RAY_DATA_ABORT) and _has_os_error(record.exc_info[1]):
            return False
        return super().filter(record)


def _has_os_error(error: BaseException | None) -> bool:
    for _ in range(8):  # Ray's task errors carry the original as `.cause`
        if error is None or isinstance(error, OSError):
            return error is not None
        error = getattr(error, "cause", None) or error.__cause__
    return False


class HarmlessAuthFilter(DropWarnings):
    """Ray's authentication logger."""

    prefixes = HARMLESS_AUTH_WARNINGS


class DropTraceback(logging.Filter):
    """Keeps the record, without its traceback, for warnings whose message starts with `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.WARNING and record.getMessage().startswith(self.prefixes):
            record.exc_info, record.exc_text = None, None
        return True


def add_filter(logger: logging.Logger, new: logging.Filter) -> None:
    """Adds `new` unless an equal filter (same type, same prefixes) is there already."""
    if not any(type(f) is type(new) and getattr(f, "prefixes", None) == getattr(new, "prefixes", None)
               for f in logger.filters):
        logger.addFilter(new)


def _ignore_harmless_py_warnings() -> None:
    for prefix in HARMLESS_PY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix))


def _quiet_train_context_logger() -> None:
    spec = importlib.util.find_spec(TRAIN_CONTEXT_MODULE)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def setup_worker() -> None:
    """Ray's `worker_process_setup_hook` for a local Ray: runs first in every worker process."""
    _ignore_harmless_py_warnings()
    _quiet_train_context_logger()
    for name, prefixes in TRACEBACK_FREE_WARNINGS.items():
        add_filter(logging.getLogger(name), DropTraceback(prefixes))


def quiet_ray(*, local: bool) -> dict:
    """Set up this process before `ray.init` (a local Ray's processes inherit its environment) and
    return the `ray.init` keyword arguments that go with it. `local`: this process starts the Ray."""
    imported = "ray.data" in sys.modules
    os.environ.setdefault(RAY_DATA_LOGGING_ENV, str(RAY_DATA_LOGGING_FILE))
    if imported:  # ray.data read its logging config before the variable was set: read it again
        from ray.data._internal.logging import configure_logging

        configure_logging()
    add_filter(logging.getLogger(AUTH_LOGGER), HarmlessAuthFilter())
    setup_worker()  # the driver runs some of Ray's machinery too
    configure_progress()
    kwargs: dict = {"logging_level": RAY_LOGGER_LEVEL}
    if local:  # a cluster's workers are set up by its own runtime environment
        kwargs["runtime_env"] = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    return kwargs


def configure_progress(*, interactive: bool | None = None) -> None:
    """Ray Data progress for this driver's datasets. On a terminal: Ray Data's live bar, one per
    dataset (its "rich" display: Ray 2.60's default tqdm_ray bar draws nothing when the driver's
    stdout is a terminal, checked under `script`). Off a terminal Ray Data logs a progress block at
    INFO every 10 s, which the console handler leaves to the log file."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True  # whatever an earlier job in this process chose (training turns it off)
    ctx.enable_operator_progress_bars = False
    ctx.enable_progress_bar_name_truncation = False
    if sys.stdout.isatty() if interactive is None else interactive:
        ctx.enable_rich_progress_bars = True
        ctx.use_ray_tqdm = False
