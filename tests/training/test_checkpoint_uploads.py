"""Checkpoints uploaded to S3 (moto's server on 127.0.0.1) while training goes on: a torn checkpoint
(files there, no completion marker) is never taken by a reader or a resume, the wall-clock cadence
adds checkpoints, and the last checkpoint is complete when the job returns."""

import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from flextok.runs import COMPLETE_FILE
from jobs.train_generator import main
from pipelines.storage import fetch_checkpoint
from pipelines.writer import OutputStore
from training.runs import checkpoint_steps, latest_checkpoint_step, newest_model

sys.path.insert(0, str(Path(__file__).parents[1] / "pipelines"))  # the S3 fault proxy of the pipeline tests
from fault_proxy import FaultProxy, FaultRule  # noqa: E402
from test_failures import write_token_rows  # noqa: E402


def test_a_torn_checkpoint_is_never_chosen(s3_server, tmp_path):
    """checkpoint 4 has its files but no marker (its upload is in flight, or died): readers take 2."""
    bucket = s3_server.make_bucket("torn")
    fs = s3_server.filesystem()
    run = f"s3://{bucket}/run"
    for step, complete in ((2, True), (4, False)):
        fs.pipe_file(f"{bucket}/run/checkpoint_{step:08d}/model.safetensors", b"weights %d" % step)
        if complete:
            fs.pipe_file(f"{bucket}/run/checkpoint_{step:08d}/{COMPLETE_FILE}", b"{}")
    store = OutputStore(run, s3_server.storage_options)
    assert checkpoint_steps(store) == [2] and latest_checkpoint_step(store) == 2
    assert newest_model(store) == "checkpoint_00000002/model.safetensors"
    local = fetch_checkpoint(run, s3_server.storage_options, cache_dir=str(tmp_path))
    assert Path(local).read_bytes() == b"weights 2"
    fs.pipe_file(f"{bucket}/run/checkpoint_00000004/{COMPLETE_FILE}", b"{}")  # its upload finished
    store.invalidate()
    assert latest_checkpoint_step(store) == 4 and newest_model(store) == "checkpoint_00000004/model.safetensors"


@pytest.mark.slow
def test_training_goes_on_while_a_checkpoint_uploads_and_the_last_one_is_complete(ray_local, s3_server, tmp_path,
                                                                                  capsys):
    """Every PUT into checkpoint 2 is answered 4 s late (a slow link), so its upload is in flight for
    seconds: training does not wait (when the upload ended, training had gone past step 2).
    Checkpoints come from the wall-clock cadence alone (--checkpoint-every is beyond the run)."""
    bucket = s3_server.make_bucket("uploads")
    tokens = tmp_path / "tokens"
    write_token_rows(tokens, max_id=1000)
    parts = urlsplit(s3_server.endpoint_url)
    proxy = FaultProxy((parts.hostname, parts.port), rules=[FaultRule(r"PUT /\S+/checkpoint_00000002/", mode="delay")],
                       stall_s=4.0)
    options = {**s3_server.storage_options, "endpoint_url": proxy.endpoint_url}
    run = f"s3://{bucket}/run"
    try:
        assert main(["--tokens", str(tokens), "--output", run, "--cond", "class", "--depth", "1", "--dim", "32",
                     "--num-heads", "2", "--threads", "1", "--warmup-steps", "1", "--batch-size", "4",
                     "--max-steps", "8", "--log-every", "2", "--checkpoint-every", "1000",
                     "--checkpoint-minutes", "0.000001", "--keep-checkpoints", "4", "--grid-every", "0",
                     "--storage-options", json.dumps(options)]) == 0
    finally:
        proxy.close()
    assert proxy.counts["delay"] >= 2  # the model and the training state, each late
    store = OutputStore(run, s3_server.storage_options)
    assert checkpoint_steps(store) == [2, 4, 6, 8]  # each log step (every 2) found the minute passed
    summary = json.loads(store.read_bytes("train_summary.json"))
    assert summary["uploaded_at_step"]["checkpoint_00000002"] > 2  # 2 when report() waits for the upload
    assert store.exists(f"checkpoint_00000008/{COMPLETE_FILE}")  # complete before the job returned
    assert store.exists("model.safetensors") and summary["step"] == 8
