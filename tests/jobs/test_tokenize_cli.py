"""`flextok tokenize` / `python -m jobs.tokenize`: flags, one-line errors, a real run on local Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs import tokenize as job

ROOT = Path(__file__).resolve().parents[2]


def _fail(capsys, argv) -> str:
    code = job.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_missing_input_is_one_line(capsys, tmp_path):
    line = _fail(capsys, ["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert line.startswith("flextok tokenize: error: input not found")


def test_unknown_model_is_one_line(capsys, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(b"")
    line = _fail(capsys, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                          "--model", str(tmp_path / "missing.safetensors")])
    assert "no such checkpoint" in line


def test_too_many_tokens_is_refused_before_any_work(capsys, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(b"")
    line = _fail(capsys, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                          "--model", "tiny", "--max-tokens", "33"])
    assert "exceeds the model's 32 tokens" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--storage-options", "{not json"),
                                        ("--storage-options", "[1]"), ("--gpus-per-actor", "-1"),
                                        ("--cpus-per-actor", "0")])
def test_bad_flag_values_exit_2(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        job.main(["--input", "x", "--output", "y", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("flextok tokenize: error:")


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        job.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--input", "--output", "--model", "--max-tokens", "--batch-size", "--actors",
                 "--gpus-per-actor", "--storage-options"):
        assert flag in out


@pytest.mark.slow
def test_flextok_tokenize_end_to_end_on_local_ray(ray_local, tiny_checkpoint, tmp_path, subprocess_env):
    from pipelines.corpus import build_corpus

    corpus = build_corpus("fashion-mnist", tmp_path / "corpus", split="test", samples_per_shard=100, limit=300)
    out = tmp_path / "tokens"
    cmd = [sys.executable, "-m", "jobs.cli", "tokenize", "--input", str(tmp_path / "corpus"), "--output", str(out),
           "--model", str(tiny_checkpoint), "--max-tokens", "8", "--batch-size", "16"]
    env = subprocess_env(ray_local.env)
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"rows     {corpus['num_samples']}" in first.stdout
    assert "tokens per row (histogram)" in first.stdout and "    8 " in first.stdout
    # Off a terminal Ray Data's progress block goes to its log file, not the console (pipelines.ray_logging)
    assert "Total Progress" not in first.stdout + first.stderr
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert second.returncode == 0 and "nothing to do" in second.stdout


def test_output_naming_a_file_is_one_line(capsys, tmp_path, real_images):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(real_images[0].data)
    (tmp_path / "taken").write_text("a file")
    line = _fail(capsys, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "taken"), "--model", "tiny"])
    assert line.endswith("is a file; name a folder (new or from an earlier run)")
