"""The whole pipeline on the session's local Ray (2 CPUs): bad input, readers, manifest, re-runs."""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow as pa
import pytest
from pipeline_helpers import outcome, read_output

from pipelines.schema import ERROR_SCHEMA, TOKEN_SCHEMA, read_file_metadata
from pipelines.tokenize import TokenizeConfig, run_tokenize


@pytest.fixture(scope="module")
def bad_run(ray_local, bad_corpus, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_run") / "dst"
    cfg = TokenizeConfig(input=bad_corpus.url, output=str(out), model=str(tiny_checkpoint), batch_size=8,
                         read_batch_rows=4)
    return cfg, run_tokenize(cfg)


def test_every_input_is_one_row_or_one_error(bad_run, bad_corpus):
    cfg, result = bad_run
    rows, errors = read_output(cfg.output)
    assert rows.num_rows + errors.num_rows == bad_corpus.num_inputs
    assert outcome(rows, errors) == bad_corpus.expected
    assert len(set(rows.column("key").to_pylist())) == rows.num_rows  # the duplicate key is written once
    dup_errors = [e for k, e in zip(errors.column("key").to_pylist(), errors.column("error").to_pylist())
                  if k in bad_corpus.duplicates]
    assert len(dup_errors) == 1 and dup_errors[0].startswith("duplicate key")
    sizes = {k: (w, h) for k, w, h in zip(*(rows.column(c).to_pylist() for c in ("key", "width", "height")))}
    assert all(sizes[k] == v for k, v in bad_corpus.sizes.items())
    counts = result.manifest["counts"]
    assert (counts["inputs"], counts["rows"], counts["errors"]) == (bad_corpus.num_inputs, rows.num_rows, errors.num_rows)
    assert set(errors.column("stage").to_pylist()) == {"read", "decode"}


def test_output_reads_back_with_every_reader(bad_run, bad_corpus):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads
    import ray

    cfg, _ = bad_run
    num_rows = len(bad_corpus.ok_keys)
    table = pads.dataset(cfg.output, format="parquet").to_table()
    assert table.schema.remove_metadata().equals(TOKEN_SCHEMA)
    meta = read_file_metadata(pads.dataset(cfg.output, format="parquet").schema)
    assert (meta["codebook_size"], meta["max_tokens"], meta["image_size"]) == (1000, 32, 32)
    assert len(meta["checkpoint_sha256"]) == 64
    frame = pd.read_parquet(cfg.output)
    assert len(frame) == num_rows and list(frame["tokens"].iloc[0]) == table.column("tokens")[0].as_py()
    ds = ray.data.read_parquet(cfg.output)
    assert ds.count() == num_rows
    assert ds.schema().base_schema.field("tokens").type == pa.list_(pa.uint16())
    first = ds.take(1)[0]
    assert len(first["tokens"]) == first["num_tokens"] == 32
    query = f"select count(*) from '{cfg.output}/*.parquet'"
    assert duckdb.connect().execute(query).fetchone()[0] == num_rows
    assert pl.read_parquet(f"{cfg.output}/*.parquet")["tokens"].dtype == pl.List(pl.UInt16)
    errors = pads.dataset(f"{cfg.output}/_errors", format="parquet").to_table()
    assert errors.schema.remove_metadata().equals(ERROR_SCHEMA)


def test_manifest_records_the_run(bad_run, bad_corpus, tiny_checkpoint):
    cfg, result = bad_run
    with open(os.path.join(cfg.output, "_manifest.json")) as f:
        manifest = json.load(f)
    assert manifest == result.manifest
    assert manifest["status"] == "complete"
    assert manifest["inputs"]["num_shards"] == 5 and manifest["inputs"]["format"] == "webdataset"
    assert manifest["model"]["checkpoint_sha256"] and manifest["model"]["config"]["num_registers"] == 32
    assert manifest["token_length_histogram"] == {"32": len(bad_corpus.ok_keys)}
    assert manifest["counts"]["errors_by_kind"]["unreadable shard"] == 2
    assert {"ray", "torch", "pyarrow", "python"} <= set(manifest["versions"])
    assert manifest["run"]["wall_time_s"] > 0 and manifest["run"]["samples_processed"] == bad_corpus.num_inputs
    assert sum(s["inputs"] for s in manifest["shards"]) == bad_corpus.num_inputs
    assert not os.path.exists(os.path.join(cfg.output, "_state", "staging"))


def test_decode_runs_in_tasks_apart_from_the_encoder_actors(bad_run):
    _, result = bad_run
    operators = [line for line in result.stats.splitlines() if line.startswith("Operator")]
    decode_op = next(line for line in operators if "decode_batch" in line)
    assert "TokenizeBatch" not in decode_op
    assert any("TokenizeBatch" in line for line in operators)


def test_finished_output_rerun_does_nothing(bad_run):
    cfg, result = bad_run
    before = {n: os.stat(os.path.join(cfg.output, n)).st_mtime_ns for n in os.listdir(cfg.output)}
    again = run_tokenize(cfg)
    assert again.nothing_to_do and again.manifest == result.manifest
    assert "nothing to do" in again.summary()
    assert {n: os.stat(os.path.join(cfg.output, n)).st_mtime_ns for n in os.listdir(cfg.output)} == before


def test_rerun_with_other_settings_is_refused(bad_run):
    cfg, _ = bad_run
    other = TokenizeConfig(input=cfg.input, output=cfg.output, model=cfg.model, max_tokens=8)
    with pytest.raises(ValueError, match="max_tokens"):
        run_tokenize(other)
    with pytest.raises(ValueError, match="checkpoint"):
        run_tokenize(TokenizeConfig(input=cfg.input, output=cfg.output, model="tiny"))
    # Every setting the tokens depend on, not only the model's: a finished output is not "nothing to do".
    for name, value in (("max_pixels", 10_000), ("min_side", 2), ("files_per_shard", 7), ("precision", "bf16")):
        with pytest.raises(ValueError, match=f"holds tokens made with {name}="):
            run_tokenize(dataclasses.replace(cfg, **{name: value}))


def test_precision_is_recorded_and_an_unrecorded_one_is_the_fp32_of_earlier_runs(bad_run, tmp_path):
    import json
    import shutil

    import pyarrow.parquet as pq

    cfg, result = bad_run
    assert result.manifest["settings"]["precision"] == "fp32"
    part = next(p for p in os.listdir(cfg.output) if p.startswith("part-"))
    assert pq.read_schema(os.path.join(cfg.output, part)).metadata[b"flextok.precision"] == b"fp32"
    # An output from before precision was recorded (its run file lacks the key) still resumes as fp32,
    # and refuses another precision.
    old = tmp_path / "old"
    shutil.copytree(cfg.output, old)
    run_file = old / "_state" / "run.json"
    settings = json.loads(run_file.read_text())
    del settings["precision"]
    run_file.write_text(json.dumps(settings))
    assert run_tokenize(dataclasses.replace(cfg, output=str(old))).nothing_to_do
    with pytest.raises(ValueError, match="holds tokens made with precision='fp32', not 'fp16'"):
        run_tokenize(dataclasses.replace(cfg, output=str(old), precision="fp16"))


def test_output_inside_the_input_folder_is_refused(bad_corpus):
    with pytest.raises(ValueError, match="inside the input"):
        run_tokenize(TokenizeConfig(input=str(bad_corpus.root), output=str(bad_corpus.root / "tokens")))


def test_gpu_decode_gives_the_same_rows_and_error_rows(bad_run, bad_corpus, tmp_path):
    """With --gpu-decode (the actors decode JPEGs; on this CPU machine with Pillow at full size) every
    input is still one row or one error, each with the same outcome as the CPU-decoded run."""
    cfg, _ = bad_run
    gpu = dataclasses.replace(cfg, output=str(tmp_path / "gpu"), gpu_decode=True)
    result = run_tokenize(gpu)
    rows, errors = read_output(gpu.output)
    assert rows.num_rows + errors.num_rows == bad_corpus.num_inputs
    assert outcome(rows, errors) == bad_corpus.expected
    assert result.manifest["settings"]["gpu_decode"] is True
    with pytest.raises(ValueError, match="holds tokens made with gpu_decode=True"):
        run_tokenize(dataclasses.replace(gpu, gpu_decode=False))
