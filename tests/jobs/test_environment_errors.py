"""Environment failures end as one line on stderr, quickly: a Ray address that does not answer, an S3
endpoint that does not answer, no S3 credentials, an output that cannot be written, a full disk
inside a Ray task (red-team finding 8 of issue 22)."""

from __future__ import annotations

import errno
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.cli_util import run_cli

ROOT = Path(__file__).resolve().parents[2]
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def _tokenize(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.tokenize", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - start


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture()
def bare_env(subprocess_env, tmp_path):
    """No AWS variables, and an AWS config home with nothing in it."""
    env = {k: v for k, v in subprocess_env().items() if k not in AWS_VARS and k != "RAY_ADDRESS"}
    env.update(HOME=str(tmp_path), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


@pytest.mark.slow
def test_ray_address_that_does_not_answer(bare_env, tmp_path, real_images):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(real_images[0].data)
    code, err, took = _tokenize(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "tiny"],
                                {**bare_env, "RAY_ADDRESS": f"127.0.0.1:{_closed_port()}"})
    line = _one_line(err)
    assert code == 1 and "does not answer" in line and "RAY_ADDRESS" in line, line
    assert took < 60  # was over 200 s


@pytest.mark.slow
def test_s3_endpoint_that_does_not_answer_and_missing_credentials(bare_env, tmp_path, s3_server):
    dead = f"http://127.0.0.1:{_closed_port()}"
    code, err, took = _tokenize(["--input", "s3://bucket-x/in", "--output", str(tmp_path / "out")],
                                {**bare_env, "AWS_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": "k",
                                 "AWS_SECRET_ACCESS_KEY": "s"})
    line = _one_line(err)
    assert code == 1 and f"the S3 endpoint {dead} does not answer" in line and took < 60, line
    code, err, _ = _tokenize(["--input", "s3://bucket-x/in", "--output", str(tmp_path / "out")],
                             {**bare_env, "AWS_ENDPOINT_URL": s3_server.endpoint_url})
    line = _one_line(err)
    assert code == 2 and "no S3 credentials for s3://bucket-x/in" in line, line


def test_output_that_cannot_be_written_is_one_line(capsys, tmp_path, real_images):
    from jobs import tokenize as job

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(real_images[0].data)
    code = job.main(["--input", str(tmp_path / "in"), "--output", "/sys/flextok-test-out", "--model", "tiny"])
    line = _one_line(capsys.readouterr().err)
    assert code in (1, 2) and line.startswith("flextok tokenize: error: ") and "/sys/flextok-test-out" in line, line


def test_full_disk_inside_a_ray_task_is_its_cause_in_one_line(ray_local, capsys):
    import argparse

    import ray

    def full_disk():  # local: pickled by value (workers cannot import this test module)
        raise OSError(errno.ENOSPC, "No space left on device", "/data/tokens/part-1.parquet")

    def body(_args):
        ray.get(ray.remote(num_cpus=0, max_retries=0)(full_disk).remote())

    code = run_cli("flextok x", body, argparse.ArgumentParser(), [])
    line = _one_line(capsys.readouterr().err)
    assert code == 1 and line == "flextok x: error: No space left on device: /data/tokens/part-1.parquet"


@pytest.mark.slow
def test_a_real_full_disk_and_a_real_read_only_output(tmp_path, subprocess_env):
    """Outputs on a size-limited tmpfs and a read-only bind mount of a private mount namespace, with a
    local Ray started inside it (its workers write the token parts and the checkpoints): each failure
    is one line with the cause and the path, exit 1; a full disk leaves no manifest (nothing claims to
    be complete), and the same command after space is freed completes with every sample exactly once.
    A disk that fills up in the middle of training ends the run at once (no retry: --max-failures is
    3), and the same command after space is freed resumes from the last complete checkpoint."""
    import json

    import pyarrow.parquet as pq
    from private_mount import namespace_problem, run_in_namespace, userns_expected

    from pipelines.corpus import build_corpus

    problem = namespace_problem(tmp_path / "probe")
    if problem is not None:
        if userns_expected():  # the kernel allows user namespaces: not being able to mount is a failure
            pytest.fail(f"user namespaces are enabled here, yet no private mount: {problem}")
        pytest.skip(f"no private mount namespace for an unprivileged user on this kernel: {problem}")
    data, full, ro, result = (tmp_path / n for n in ("data", "full", "ro", "result"))
    for folder in (full, ro, result):
        folder.mkdir()
    build_corpus("fashion-mnist", data, limit=64, samples_per_shard=16)
    env = {k: v for k, v in subprocess_env().items() if k != "RAY_ADDRESS"}
    proc = run_in_namespace(sys.executable, full, ro, "8m", [str(full), str(ro), str(data), str(result)], env, 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((result / "result.json").read_text())

    def error_line(run: dict, prog: str) -> str:
        lines = run["err"].strip().splitlines()
        assert run["code"] == 1 and "Traceback" not in run["err"] and len(lines) <= 2, run["err"][-3000:]
        assert lines[-1].startswith(f"flextok {prog}: error: "), lines
        return lines[-1]

    assert f"Read-only file system: {ro}/tokens" in error_line(runs["tokenize_ro"], "tokenize")
    assert f"Read-only file system: {ro}/run" in error_line(runs["train_ro"], "train-tokenizer")
    assert f"No space left on device: {full}/tokens/" in error_line(runs["tokenize_full"], "tokenize")
    assert not runs["tokenize_full"]["manifest"]
    assert runs["tokenize_rerun"]["code"] == 0, runs["tokenize_rerun"]["err"][-3000:]
    keys = pq.read_table(sorted((result / "tokens").glob("part-*.parquet")), columns=["key"])["key"].to_pylist()
    assert len(keys) == len(set(keys)) == 64  # every sample once: nothing lost, nothing twice
    manifest = json.loads((result / "tokens" / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 64 and manifest["counts"]["errors"] == 0

    train = runs["train_full"]
    assert train["filled"] and f"No space left on device: {full}/run" in error_line(train, "train-generator")
    assert train["attempts"] == 1  # Ray Train retried nothing (--max-failures 3)
    assert not train["model"] and not train["summary"]  # no model presented as the run's
    rerun = runs["train_rerun"]
    assert rerun["code"] == 0 and rerun["summary"]["step"] == 24, rerun["err"][-3000:]
    resumed = re.search(r"generator resumed from step (\d+)", rerun["err"])
    assert resumed and 4 <= int(resumed.group(1)) < 24, rerun["err"][-3000:]  # not from scratch


def test_ray_datas_retry_note_is_cut_from_a_stage_error_that_crossed_to_the_driver():
    """Ray Data appends its retry advice to the arguments of an error raised in a stage, and the error
    is pickled to the driver: the one line is still the cause and the path."""
    import pickle

    from ray.data._internal.util import _annotate_exception_with_retry_context

    from jobs.cli_util import one_line
    from pipelines.writer import OutputWriteError

    error = _annotate_exception_with_retry_context(
        OutputWriteError("No space left on device: /data/tokens/part-1.parquet"), description="apply UDF transform",
        attempts=1, max_attempts=1, total_backoff_s=0.0, exception_str="")
    assert "retried_map_errors" in str(error)  # Ray's note is there (the format this test pins)
    assert one_line(pickle.loads(pickle.dumps(error))) == "No space left on device: /data/tokens/part-1.parquet"


def test_a_training_workers_full_disk_is_its_cause_in_one_line(capsys):
    """Ray Train ends a run whose workers failed with a WorkerGroupError holding each rank's error."""
    import argparse

    from ray.train import WorkerGroupError

    def body(_args):
        raise WorkerGroupError("rank 0: ...", {
            1: OSError(errno.ENOSPC, "No space left on device", "/runs/tok/checkpoint_00000002/b"),
            0: OSError(errno.ENOSPC, "No space left on device", "/runs/tok/checkpoint_00000002/a")})

    assert run_cli("flextok x", body, argparse.ArgumentParser(), []) == 1
    assert _one_line(capsys.readouterr().err) == "flextok x: error: No space left on device: /runs/tok/checkpoint_00000002/a"
