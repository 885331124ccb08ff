"""Failure policy under `--max-failures -1` (unlimited retries, for spot clusters): a user error raised
inside a worker ends the run at once with its one line; a real worker death is still retried."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.train_generator import main
from pipelines.schema import TOKEN_SCHEMA, file_metadata
from training.loop import CRASH_MARKER_ENV, CRASH_STEP_ENV
from training.runs import USER_ERROR_FILE

ARGS = ["--cond", "class", "--depth", "1", "--dim", "32", "--num-heads", "2", "--threads", "1", "--warmup-steps", "1",
        "--batch-size", "4", "--max-steps", "3", "--checkpoint-every", "2", "--grid-every", "0", "--max-failures", "-1"]


def write_token_rows(folder, max_id: int) -> None:
    """16 rows of 1..8 random ids below `max_id` (ids >= 1000 do not exist in the recorded codebook)."""
    rng = np.random.default_rng(0)
    lengths = [1 + i % 8 for i in range(16)]
    table = pa.Table.from_pydict({
        "key": [f"k{i}" for i in range(16)],
        "tokens": pa.array([rng.integers(0, max_id, k).tolist() for k in lengths], pa.list_(pa.uint16())),
        "num_tokens": pa.array(lengths, pa.uint16()), "label": pa.array([i % 4 for i in range(16)], pa.int32()),
        "caption": pa.array([None] * 16, pa.string()), "source": ["s"] * 16,
        "width": pa.array([32] * 16, pa.int32()), "height": pa.array([32] * 16, pa.int32()),
    }, schema=TOKEN_SCHEMA)
    md = file_metadata(checkpoint_id="preset:tiny", checkpoint_sha256=None, codebook_size=1000,
                       fsq_levels=(8, 5, 5, 5), max_tokens=32, image_size=32)
    folder.mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata(md), folder / "part-000.parquet")


@pytest.mark.slow
def test_a_user_error_in_a_worker_ends_an_unlimited_retry_run_at_once(ray_local, tmp_path, capsys):
    """Token ids outside the codebook are found by the worker's loss (the driver reads footers only):
    with unlimited retries the run still ends, with the worker's one line, and no model is published."""
    tokens, run = tmp_path / "tokens", tmp_path / "run"
    write_token_rows(tokens, max_id=5000)
    assert main(["--tokens", str(tokens), "--output", str(run), *ARGS]) == 2
    err = capsys.readouterr().err  # the workers' logs reach it too (the session's Ray logs to the driver)
    assert err.strip().splitlines()[-1] == "flextok train-generator: error: token ids must be < codebook_size=1000"
    assert err.count("generator: 1 worker(s)") == 1  # one training attempt; the retry ended before training
    assert json.loads((run / USER_ERROR_FILE).read_text())["rank"] == 0
    assert not (run / "model.safetensors").exists() and not (run / "train_summary.json").exists()


@pytest.mark.slow
def test_a_killed_worker_is_still_retried_under_unlimited_retries(ray_local, tmp_path, monkeypatch, capsys):
    tokens, run, marker = tmp_path / "tokens", tmp_path / "run", tmp_path / "killed"
    write_token_rows(tokens, max_id=1000)
    monkeypatch.setenv(CRASH_STEP_ENV, "3")
    monkeypatch.setenv(CRASH_MARKER_ENV, str(marker))
    assert main(["--tokens", str(tokens), "--output", str(run), *ARGS]) == 0
    assert marker.read_text().startswith("killed at step 3")  # the process died, and the run went on
    assert json.loads((run / "train_summary.json").read_text())["step"] == 3
    assert not (run / USER_ERROR_FILE).exists()
