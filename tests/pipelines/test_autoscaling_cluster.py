"""The cluster path end to end: `ray job submit --working-dir .` of the tokenize job on a local
*autoscaling* Ray cluster (Ray's fake multi-node provider: a head without CPUs or GPUs, GPU worker
nodes from zero), with input, output and model on the S3 server (127.0.0.1)."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from fake_cluster import FakeAutoscalingCluster
from pipeline_helpers import outcome, read_output
from test_s3 import AWS_VARS, upload_corpus

from flextok.checkpoint import file_sha256

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster(s3_server, tmp_path):
    """The cluster's environment plays the nodes' instance role: S3 credentials and endpoint come
    from it. The job imports the uploaded working dir, not this checkout (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS and not k.startswith("RAY_")}
    env.pop("PYTHONPATH", None)
    bin_dir = str(Path(sys.executable).parent)  # `python` in the job's entrypoint is the venv's
    env.update(s3_server.env, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               XDG_CACHE_HOME=str(tmp_path / "node-cache"))  # the nodes' model cache, not ~/.cache
    cluster = FakeAutoscalingCluster.start(env, worker_cpus=2, max_workers=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_tokenize_job_scales_gpu_workers_from_zero_and_writes_only_on_workers(cluster, s3_server, bad_corpus,
                                                                              tiny_checkpoint):
    bucket = upload_corpus(s3_server, bad_corpus)
    s3_server.filesystem().put_file(str(tiny_checkpoint), f"{bucket}/models/tiny.safetensors")
    (head,) = cluster.nodes()
    assert head["is_head_node"] and not head["resources_total"].get("GPU") and not head["resources_total"].get("CPU")

    submission = f"tokenize-{uuid.uuid4().hex[:8]}"
    job = cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", submission, "--working-dir", ".",
        "--", "python", "-m", "jobs.tokenize",
        "--input", f"s3://{bucket}/in/shard-{{000000..000004}}.tar", "--output", f"s3://{bucket}/out",
        "--model", f"s3://{bucket}/models/tiny.safetensors",
        "--actors", "2", "--gpus-per-actor", "1", "--device", "cpu", "--batch-size", "8",
        cwd=ROOT, timeout_s=600,
    )
    log = job.stdout + job.stderr
    status = cluster.ray("job", "status", "--address", cluster.dashboard, submission)
    assert job.returncode == 0 and f"Job '{submission}' succeeded" in status.stdout + status.stderr, log[-4000:]
    assert "waiting for GPU nodes" in log  # the job said why it waited

    # Every input is one row or one error, as on a laptop; the model is the one on S3.
    fs = s3_server.filesystem()
    rows, errors = read_output(f"{bucket}/out", filesystem=fs)
    assert rows.num_rows + errors.num_rows == bad_corpus.num_inputs
    assert outcome(rows, errors) == bad_corpus.expected
    manifest = json.loads(fs.cat_file(f"{bucket}/out/_manifest.json"))
    assert manifest["status"] == "complete" and manifest["counts"]["inputs"] == bad_corpus.num_inputs
    assert manifest["model"]["checkpoint_sha256"] == file_sha256(tiny_checkpoint)

    # The autoscaler went from no GPU node to at least one, and the encoders ran there.
    nodes = {n["node_id"]: n for n in cluster.nodes()}
    gpu_nodes = {nid for nid, n in nodes.items() if n["resources_total"].get("GPU")}
    assert gpu_nodes
    actors = [a for a in cluster.state("actors") if "TokenizeBatch" in a["class_name"]]
    assert actors and {a["node_id"] for a in actors} <= gpu_nodes

    # No write or finalize task ran on the head (its `CPU: 0` says: schedule only).
    tasks = cluster.state("tasks")
    writes = [t for t in tasks if "write_pieces_batch" in t["name"]]
    finals = [t for t in tasks if "finalize_shard_task" in t["name"]]
    assert writes and len({t["task_id"] for t in finals}) == len(manifest["shards"])
    placed = {t["node_id"] for t in writes + finals if t.get("node_id")}
    assert placed and head["node_id"] not in placed and placed <= gpu_nodes
