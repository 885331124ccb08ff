"""Failure policy under `--max-failures -1` (unlimited retries, for spot clusters): a user error raised
inside a worker ends the run at once with its one line (`training.failures.StopOnFinalErrors`); a
real worker death is still retried."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.train_generator import main
from pipelines.schema import TOKEN_SCHEMA, file_metadata
from training.loop import CRASH_MARKER_ENV, CRASH_STEP_ENV

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
    assert err.count("generator: 1 worker(s)") == 1  # one training attempt: not retried
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


def garble_column_pages(path, column: str) -> None:
    """Overwrite every page of `column` (row group 0) with random bytes, the footer left as it was:
    what a torn copy or bit rot leaves. The file still opens; reading that column fails."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    chunk = meta.row_group(0).column(next(i for i, n in enumerate(names) if n.split(".")[0] == column))
    start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)
    data = bytearray(path.read_bytes())
    data[start:start + chunk.total_compressed_size] = np.random.default_rng(1).bytes(chunk.total_compressed_size)
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_token_file_with_garbage_pages_ends_the_run_with_one_line_naming_it(ray_local, tmp_path, capsys):
    """The driver reads footers only (intact here), so the corrupt pages are found by the worker that
    reads them: the run ends at once, even under unlimited retries, with one line naming the file."""
    tokens, run = tmp_path / "tokens", tmp_path / "run"
    write_token_rows(tokens, max_id=1000)
    good = tokens / "part-000.parquet"
    bad = tokens / "part-001.parquet"
    bad.write_bytes(good.read_bytes())
    garble_column_pages(bad, "tokens")
    assert pq.ParquetFile(bad).metadata.num_rows == 16  # the footer reads ...
    with pytest.raises((pa.ArrowException, OSError)):  # ... the pages do not
        pq.ParquetFile(bad).read(columns=["tokens"])
    assert main(["--tokens", str(tokens), "--output", str(run), *ARGS]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"flextok train-generator: error: {bad} is corrupt (row group 0 cannot be read: "), last
    assert "Traceback" not in err and err.count("generator: 1 worker(s)") == 1, err[-3000:]  # one attempt
    assert not (run / "model.safetensors").exists() and not (run / "train_summary.json").exists()


def test_garbage_pages_the_driver_reads_are_one_line_naming_the_file(tmp_path):
    """Without row-group statistics the driver reads the label column itself to check the label range."""
    from training.data import inspect_tokens
    from training.runs import UnreadableDataError, open_run

    tokens = tmp_path / "tokens"
    write_token_rows(tokens, max_id=1000)
    path = tokens / "part-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table, path, write_statistics=False)
    garble_column_pages(path, "label")
    assert pq.ParquetFile(path).metadata.num_rows == 16
    with pytest.raises(UnreadableDataError, match=f"^{path} is corrupt \\(a row group cannot be read: "):
        inspect_tokens(open_run(str(tokens)))
