"""Worker errors that end a run at once, and what the terminal shows of them.

Ray Train 2.60 retries every worker failure up to `FailureConfig(max_failures)` (-1: forever) and has
no public hook to make an error final. A user error (bad data, bad settings) or a filesystem that
takes no more writes (`training.runs.final_error_of`) is fixed by no retry: each retry would restart
the worker group, resume and fail again (a full disk took ~190 s and four rounds of tracebacks to
end). `TorchTrainer` here hands Ray's controller `StopOnFinalErrors`, Ray's `DefaultFailurePolicy`
except that it raises a final error at once; everything else (a killed worker, a lost node, a storage
fault) is retried as before. The error reaches the driver inside Ray's `WorkerGroupError` (or
`ControllerError`, when the controller's own write of its record hits the full disk), over Ray's
channels, not through RUN, which may be the full disk.

A full disk and an unreadable data file are said by the job's one line (`jobs.cli_util.run_cli`):
Ray's reports of them in the workers and the controller, tracebacks and all, are dropped
(`QuietFinalErrors`, installed by `quiet_final_errors` in each worker and, through the policy's
unpickling, in the controller). A user error's traceback stays: it may be a bug.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ray.train.torch import TorchTrainer as _RayTorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import TrainingFailedError

from training.runs import UnreadableDataError, causes, final_error_of, is_out_of_space

# Ray Train 2.60's loggers that report a failure with its traceback (message prefixes).
RAY_FAILURE_REPORTS: dict[str, tuple[str, ...]] = {
    "ray.train.v2._internal.util": ("Error in training function",),  # a worker's training function raised
    "ray.train.v2._internal.execution.controller.controller": ("Error in control loop iteration",),
}
# The worker context's logger is named by its file path (`logging.getLogger(__file__)`): the upload
# thread's "checkpoint upload failed in the background thread".
TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"
UPLOAD_FAILED = ("`ray.train.report(checkpoint_upload_mode=ASYNC)` checkpoint upload failed",)


def is_quiet(error: BaseException | None) -> bool:
    """Whether the job's one line says all there is: a full or read-only disk, an unreadable data file."""
    return error is not None and any(is_out_of_space(e) or isinstance(e, UnreadableDataError)
                                     for e in causes(error))


class QuietFinalErrors(logging.Filter):
    """Drops Ray's report of a failure whose error `is_quiet` (the report's exception, or the one being
    handled: Ray formats the training function's traceback into the message)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefixes):
            return True
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not is_quiet(error)


def quiet_final_errors() -> None:
    """Install `QuietFinalErrors` on Ray Train's failure reports in this process (once), and drop the
    report of a background thread that died of a quiet error (TensorBoard's event writer on a full
    disk: it keeps the error and raises it into the training loop at its next write)."""
    import importlib.util
    import threading

    if not getattr(threading.excepthook, "quiet_final_errors", False):
        report = threading.excepthook

        def excepthook(args: threading.ExceptHookArgs) -> None:
            if not is_quiet(args.exc_value):
                report(args)

        excepthook.quiet_final_errors = True  # type: ignore[attr-defined]
        threading.excepthook = excepthook

    loggers = dict(RAY_FAILURE_REPORTS)
    spec = importlib.util.find_spec(TRAIN_CONTEXT_MODULE)
    if spec is not None and spec.origin:
        loggers[spec.origin] = UPLOAD_FAILED
    for name, prefixes in loggers.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietFinalErrors) for f in logger.filters):
            logger.addFilter(QuietFinalErrors(prefixes))


class StopOnFinalErrors(DefaultFailurePolicy):
    """Ray's default failure policy, except that a final error (`final_error_of`) is raised at once."""

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if final_error_of(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        quiet_final_errors()  # unpickled in Ray Train's controller process


class TorchTrainer(_RayTorchTrainer):
    """Ray's `TorchTrainer` whose controller applies `StopOnFinalErrors` (Ray 2.60 builds its default
    policy in `fit` and passes it to `_initialize_and_run_controller`, the one place to replace it)."""

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any):
        controller_init_kwargs["failure_policy"] = StopOnFinalErrors(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
