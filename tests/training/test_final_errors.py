"""Errors no retry fixes end a run at once (`training.failures`), and Ray's record of the checkpoints
survives a disk that filled up mid-run (`training.runs.restore_ray_snapshot`). The end-to-end runs are
in tests/jobs/test_environment_errors.py (a real full disk) and tests/training/test_failures.py."""

from __future__ import annotations

import errno
import json
import logging
import pickle

import pytest
from ray.train import ControllerError, FailureConfig, WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState
from ray.train.v2._internal.execution.failure_handling import FailureDecision

from flextok.runs import COMPLETE_FILE, MARKED_RUN_FILE
from pipelines.writer import OutputWriteError
from training.failures import QuietFinalErrors, StopOnFinalErrors
from training.runs import (
    RAY_SNAPSHOT_FILE,
    SNAPSHOT_COPY_FILE,
    UnreadableDataError,
    checkpoint_steps,
    copy_ray_snapshot,
    final_error_of,
    mark_recorded_checkpoints,
    open_run,
    out_of_space_at,
    restore_ray_snapshot,
)

FULL = OSError(errno.ENOSPC, "No space left on device")  # as pyarrow raises it: no file


def workers_failed(*errors: BaseException) -> WorkerGroupError:
    """A WorkerGroupError as the controller receives it: each worker's error wrapped, pickled over."""
    failures = {rank: UserExceptionWithTraceback(e, "Traceback ...") for rank, e in enumerate(errors)}
    return pickle.loads(pickle.dumps(WorkerGroupError("rank 0: ...", failures)))


@pytest.mark.parametrize("error", [
    FULL, OSError(errno.EROFS, "Read-only file system", "/run/x"), OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError(errno.EFBIG, "File too large"), ValueError("token ids must be < codebook_size=1000"),
    UnreadableDataError("/tokens/part-1.parquet is corrupt"), FileNotFoundError("no token files"),
])
def test_an_error_no_retry_fixes_is_raised_at_once_even_under_unlimited_retries(error):
    policy = pickle.loads(pickle.dumps(StopOnFinalErrors(FailureConfig(max_failures=-1))))  # as the controller gets it
    group = workers_failed(ConnectionResetError("gloo: peer closed"), error)  # rank 1's error, rank 0 collateral
    assert final_error_of(group).args == error.args
    assert policy.make_decision(group) == FailureDecision.RAISE
    assert policy.make_decision(pickle.loads(pickle.dumps(ControllerError(error)))) == FailureDecision.RAISE


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"), ConnectionError("storage unreachable"), RuntimeError("NCCL timeout"),
    OSError(errno.ECONNRESET, "Connection reset by peer"),
])
def test_other_worker_errors_are_retried_as_ray_would(error):
    policy = StopOnFinalErrors(FailureConfig(max_failures=2))
    group = workers_failed(error)
    assert final_error_of(group) is None
    assert [policy.make_decision(group) for _ in range(3)] == [FailureDecision.RETRY] * 2 + [FailureDecision.RAISE]


def test_a_full_disk_is_one_picklable_error_naming_a_file():
    located = pickle.loads(pickle.dumps(out_of_space_at(FULL, "/runs/g/checkpoint_00000004")))
    assert (located.errno, located.strerror, located.filename) == (
        errno.ENOSPC, "No space left on device", "/runs/g/checkpoint_00000004")
    try:  # a local write that failed says its file in its message; its cause has the errno
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise OutputWriteError("No space left on device: /runs/g/checkpoint_00000004/_COMPLETE") from e
    except OutputWriteError as e:
        written = e
    assert final_error_of(written) is written
    assert out_of_space_at(written, "/runs/g").filename == "/runs/g/checkpoint_00000004/_COMPLETE"


def test_rays_report_of_a_full_disk_is_dropped_and_of_a_bug_kept():
    quiet = QuietFinalErrors(("Error in training function",))

    def kept(error: BaseException, message: str = "Error in training function:\nTraceback ...") -> bool:
        try:
            raise error
        except BaseException:  # Ray formats the traceback of the exception being handled into the message
            return quiet.filter(logging.LogRecord("ray", logging.ERROR, __file__, 1, message, None, None))

    assert not kept(out_of_space_at(FULL, "/runs/g"))
    assert not kept(UnreadableDataError("/tokens/part-1.parquet is corrupt"))
    assert kept(RuntimeError("a bug"))
    assert kept(ValueError("token ids must be < codebook_size=1000"))  # a user error may be a bug: its traceback stays
    assert kept(out_of_space_at(FULL, "/runs/g"), "something else")


def _record(*names: str) -> dict:
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {"step": int(n.split("_")[1])}} for n in names]
    return {"ray_version": "2.60.0", "checkpoint_results": results, "checkpoint_report_indices": list(range(len(names))),
            "latest_checkpoint_result": results[-1], "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": len(names), "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}


def _checkpoint(run, name: str, complete: bool = True) -> None:
    (run / name).mkdir()
    (run / name / "model.safetensors").write_bytes(b"x")
    if complete:
        (run / name / COMPLETE_FILE).write_text("{}")


def test_rays_record_cut_short_by_a_full_disk_is_restored_from_the_copy_of_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKED_RUN_FILE).write_bytes(b"")
    store = open_run(str(run))
    _checkpoint(run, "checkpoint_00000002")
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps(_record("checkpoint_00000002")))
    copy_ray_snapshot(store, "checkpoint_00000002")
    _checkpoint(run, "checkpoint_00000004")
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps(_record("checkpoint_00000002", "checkpoint_00000004")))
    copy_ray_snapshot(store, "checkpoint_00000004")
    _checkpoint(run, "checkpoint_00000006", complete=False)  # its upload filled the disk
    (run / "checkpoint_00000002" / COMPLETE_FILE).unlink()  # Ray deleted the oldest (keep 2) ...
    (run / "checkpoint_00000002" / "model.safetensors").unlink()
    (run / "checkpoint_00000002").rmdir()
    (run / RAY_SNAPSHOT_FILE).write_bytes(b"")  # ... and its next record was cut short
    restore_ray_snapshot(store)
    restored = json.loads((run / RAY_SNAPSHOT_FILE).read_text())
    state = _CheckpointManagerState.model_validate(restored)  # Ray's own model of it takes it
    assert [r.checkpoint_dir_name for r in state.checkpoint_results] == ["checkpoint_00000004"]
    assert state.latest_checkpoint_result.checkpoint_dir_name == "checkpoint_00000004"
    assert state.checkpoint_report_indices == [1]
    assert checkpoint_steps(store) == [4]  # the partial checkpoint 6 is not taken


def test_an_unreadable_record_without_a_copy_starts_the_run_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKED_RUN_FILE).write_bytes(b"")
    _checkpoint(run, "checkpoint_00000002", complete=False)
    (run / RAY_SNAPSHOT_FILE).write_bytes(b'{"ray_version": "2.6')
    store = open_run(str(run))
    restore_ray_snapshot(store)
    assert not (run / RAY_SNAPSHOT_FILE).exists() and checkpoint_steps(store) == []


def test_checkpoints_rays_record_names_are_marked_complete_and_others_not(tmp_path):
    """Ray records a checkpoint once every worker uploaded it; rank 0 may not have marked it before the
    disk filled up."""
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKED_RUN_FILE).write_bytes(b"")
    for name in ("checkpoint_00000004", "checkpoint_00000006", "checkpoint_00000008"):
        _checkpoint(run, name, complete=False)
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps(_record("checkpoint_00000002", "checkpoint_00000004",
                                                            "checkpoint_00000006")))
    store = open_run(str(run))
    assert checkpoint_steps(store) == []
    mark_recorded_checkpoints(store)
    assert checkpoint_steps(store) == [4, 6]  # 8 is not in Ray's record; 2 is gone
    assert not (run / "checkpoint_00000002").exists()


def test_a_copy_is_taken_only_of_a_record_that_names_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    store = open_run(str(run))
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps(_record("checkpoint_00000002")))
    copy_ray_snapshot(store, "checkpoint_00000002")
    assert json.loads((run / SNAPSHOT_COPY_FILE).read_text()) == _record("checkpoint_00000002")
    (run / RAY_SNAPSHOT_FILE).write_bytes(b"")
    copy_ray_snapshot(store, "checkpoint_00000004", wait_s=0)  # unreadable: the copy stays as it was
    assert json.loads((run / SNAPSHOT_COPY_FILE).read_text()) == _record("checkpoint_00000002")


def test_a_run_from_before_markers_keeps_all_its_checkpoints_and_a_marked_run_only_marked_ones(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _checkpoint(run, "checkpoint_00000002", complete=False)
    assert checkpoint_steps(open_run(str(run))) == [2]  # written whole, before markers existed
    (run / MARKED_RUN_FILE).write_bytes(b"")
    assert checkpoint_steps(open_run(str(run))) == []  # this run marks its checkpoints: 2 is partial


def test_the_policy_quiets_the_controllers_report_where_it_is_unpickled():
    """Ray Train's controller runs in its own actor: the policy, pickled there, installs the filter."""
    controller = logging.getLogger("ray.train.v2._internal.execution.controller.controller")
    for f in [f for f in controller.filters if isinstance(f, QuietFinalErrors)]:
        controller.removeFilter(f)
    policy = StopOnFinalErrors(FailureConfig(max_failures=1))
    assert not any(isinstance(f, QuietFinalErrors) for f in controller.filters)
    pickle.loads(pickle.dumps(policy))
    record = logging.LogRecord(controller.name, logging.ERROR, __file__, 1, "Error in control loop iteration: %s",
                               (FULL,), (OSError, FULL, None))
    assert not controller.filter(record)  # dropped: the job's one line says it
    record.exc_info = (RuntimeError, RuntimeError("a bug"), None)
    assert controller.filter(record)
