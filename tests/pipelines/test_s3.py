"""Input and output on s3:// through moto's S3 server on 127.0.0.1 (the session's `s3_server`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from pipeline_helpers import outcome, read_output

from pipelines.schema import TOKEN_SCHEMA
from pipelines.tokenize import TokenizeConfig, run_tokenize

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


def upload_corpus(s3_server, corpus) -> str:
    bucket = s3_server.make_bucket("corpus")
    fs = s3_server.filesystem()
    for path in sorted(corpus.root.glob("*.tar")):
        fs.put_file(str(path), f"{bucket}/in/{path.name}")
    return bucket


def all_objects(fs, prefix: str) -> dict[str, bytes]:
    return {p: fs.cat_file(p) for p in fs.find(prefix)}


def test_s3_both_ends_with_credentials_from_the_environment(s3_server, ray_local, bad_corpus, tiny_checkpoint,
                                                            subprocess_env):
    import ray

    bucket = upload_corpus(s3_server, bad_corpus)
    src = f"s3://{bucket}/in/shard-{{000000..000004}}.tar"
    dst = f"s3://{bucket}/out"
    env = subprocess_env(ray_local.env, s3_server.env)
    cmd = [sys.executable, "-m", "jobs.tokenize", "--input", src, "--output", dst, "--model", str(tiny_checkpoint),
           "--batch-size", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    fs = s3_server.filesystem()
    rows, errors = read_output(f"{bucket}/out", filesystem=fs)
    assert rows.num_rows + errors.num_rows == bad_corpus.num_inputs
    assert outcome(rows, errors) == bad_corpus.expected
    assert pads.dataset(f"{bucket}/out", format="parquet", filesystem=fs).schema.remove_metadata().equals(TOKEN_SCHEMA)
    ds = ray.data.read_parquet(dst, filesystem=pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs)))
    assert ds.count() == rows.num_rows

    objects = all_objects(fs, f"{bucket}/out")
    manifest = json.loads(objects[f"{bucket}/out/_manifest.json"])
    assert manifest["counts"]["inputs"] == bad_corpus.num_inputs
    assert manifest["inputs"]["url"] == src
    assert not any(k.startswith(f"{bucket}/out/_state/staging") for k in objects)
    for secret in (s3_server.secret, s3_server.key):  # secrets never written or logged
        assert secret not in proc.stdout and secret not in proc.stderr
        assert not any(secret.encode() in data for data in objects.values())


def test_s3_with_storage_options_and_rerun(s3_server, ray_local, bad_corpus, tiny_checkpoint, monkeypatch, caplog):
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    bucket = upload_corpus(s3_server, bad_corpus)
    cfg = TokenizeConfig(input=f"s3://{bucket}/in", output=f"s3://{bucket}/tokens", model=str(tiny_checkpoint),
                         storage_options=s3_server.storage_options)
    caplog.set_level("DEBUG")
    result = run_tokenize(cfg)
    assert result.manifest["counts"]["inputs"] == bad_corpus.num_inputs - 1  # no missing shard in a folder
    assert result.manifest["inputs"]["storage_options"]["secret"] == "***"
    again = run_tokenize(cfg)
    assert again.nothing_to_do
    assert s3_server.secret not in caplog.text
    assert s3_server.secret not in json.dumps(result.manifest)
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ
