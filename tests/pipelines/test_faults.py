"""Exactly once under failure, on real parts: a SIGKILLed driver, a killed actor, a removed node.

Each run is compared with an uninterrupted reference run of the same corpus: the same keys and
tokens in byte-identical part files, nothing lost, nothing duplicated.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray.cloudpickle
from pipeline_helpers import build_fashion_corpus, read_output

from pipelines.encode import TokenizeBatch
from pipelines.tokenize import TokenizeConfig, run_tokenize

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NUM_SHARDS = 12
REGISTRY = f"encoder-registry-{uuid.uuid4().hex[:8]}"

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_fashion_corpus(tmp_path_factory.mktemp("fault_corpus"), num=100 * NUM_SHARDS, per_shard=100)


@pytest.fixture(scope="module")
def reference(ray_local, corpus, tiny_checkpoint, tmp_path_factory):
    """An uninterrupted run: what every interrupted run must end up identical to."""
    out = tmp_path_factory.mktemp("reference") / "dst"
    run_tokenize(TokenizeConfig(input=corpus.url, output=str(out), model=str(tiny_checkpoint), batch_size=32))
    return out


def files_of(dst: Path) -> dict[str, bytes]:
    """Every visible Parquet file of a token dataset (rows and errors), by relative path."""
    return {str(p.relative_to(dst)): p.read_bytes() for p in sorted(dst.rglob("*.parquet"))
            if not str(p.relative_to(dst)).startswith("_state")}


def assert_same_as_reference(dst: Path, reference: Path, corpus) -> None:
    rows, errors = read_output(dst)
    assert rows.num_rows + errors.num_rows == corpus.num_inputs
    assert rows.column("key").to_pylist() == sorted(corpus.expected)  # every key once
    assert files_of(dst) == files_of(reference)


def done_count(dst: Path) -> int:
    done = dst / "_state" / "done"
    return len(list(done.glob("*.json"))) if done.is_dir() else 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_same_tokens_twice_whatever_the_batching(reference, corpus, tiny_checkpoint, tmp_path):
    out = tmp_path / "dst"
    run_tokenize(TokenizeConfig(input=corpus.url, output=str(out), model=str(tiny_checkpoint), batch_size=7,
                                read_batch_rows=5))
    assert_same_as_reference(out, reference, corpus)


def test_driver_sigkill_then_rerun_resumes(reference, corpus, tiny_checkpoint, tmp_path, ray_local, subprocess_env):
    out = tmp_path / "dst"
    cmd = [sys.executable, "-m", "jobs.tokenize", "--input", corpus.url, "--output", str(out),
           "--model", str(tiny_checkpoint), "--batch-size", "32"]
    env = subprocess_env(ray_local.env)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: done_count(out) >= 1 or proc.poll() is not None, 240, "a first finished shard")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    finished_before = done_count(out)
    assert 1 <= finished_before < NUM_SHARDS, "the driver should die mid-run"
    assert not (out / "_manifest.json").exists()
    time.sleep(2)  # let Ray reap the dead driver's tasks

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_same_as_reference(out, reference, corpus)
    run = json.loads((out / "_manifest.json").read_text())["run"]
    assert run["shards_already_done"] >= finished_before
    assert run["samples_processed"] <= corpus.num_inputs - 100 * finished_before  # finished work not redone
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0 and "nothing to do" in again.stdout


class Registry:
    """Holds the handles of encoder actors so the test can kill one."""

    def __init__(self):
        self.handles = []

    def add(self, handle):
        self.handles.append(handle)

    def get(self):
        return list(self.handles)


class SlowRegisteredTokenizeBatch(TokenizeBatch):
    """The real stage, registering its actor handle and slowed down so that a kill lands mid-run."""

    def __init__(self, *args, **kwargs):
        import ray

        super().__init__(*args, **kwargs)
        ray.get(ray.get_actor(REGISTRY).add.remote(ray.get_runtime_context().current_actor))

    def __call__(self, batch):
        time.sleep(0.1)
        return super().__call__(batch)


def test_killed_actor_is_replaced_and_nothing_is_lost(reference, corpus, tiny_checkpoint, tmp_path, ray_local):
    import ray

    registry = ray.remote(num_cpus=0)(Registry).options(name=REGISTRY).remote()
    out = tmp_path / "dst"
    cfg = TokenizeConfig(input=corpus.url, output=str(out), model=str(tiny_checkpoint), batch_size=32)
    results: dict = {}

    def run():
        try:
            results["result"] = run_tokenize(cfg, encoder_cls=SlowRegisteredTokenizeBatch)
        except BaseException as e:  # surfaced below
            results["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: done_count(out) >= 1 or not thread.is_alive(), 240, "a first finished shard")
        handles = ray.get(registry.get.remote())
        assert handles and done_count(out) < NUM_SHARDS, "the actor should die mid-run"
        ray.kill(handles[0], no_restart=False)
        thread.join(timeout=400)
        registrations = len(ray.get(registry.get.remote()))
    finally:
        thread.join(timeout=400)
        ray.kill(registry)
    assert "error" not in results, results.get("error")
    assert registrations >= 2, "the killed actor should have been restarted"
    assert_same_as_reference(out, reference, corpus)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_node_removed_mid_run(reference, corpus, tiny_checkpoint, tmp_path, subprocess_env):
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    # The dashboard serves the State API, which tells afterwards where every task and actor ran.
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_port": _free_port(),
                                      "object_store_memory": 256 * 1024**2})
    worker = cluster.add_node(num_cpus=2, object_store_memory=256 * 1024**2)
    cluster.wait_for_nodes()
    out = tmp_path / "dst"
    cmd = [sys.executable, "-m", "jobs.tokenize", "--input", corpus.url, "--output", str(out),
           "--model", str(tiny_checkpoint), "--batch-size", "32", "--actors", "2"]
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env({"RAY_ADDRESS": cluster.address}),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: done_count(out) >= 1 or proc.poll() is not None, 240, "a first finished shard")
        assert done_count(out) < NUM_SHARDS, "the node should go mid-run"
        cluster.remove_node(worker)
        log, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, log[-3000:]
        assert "2 node(s)" in log  # it did start on both nodes
        # ... and the removed node held some of the work (tasks or encoder actors) when it went.
        on_removed = [("node_id", "=", worker.node_id)]
        held = list_tasks(address=cluster.address, filters=on_removed, limit=10_000, raise_on_missing_output=False)
        held += list_actors(address=cluster.address, filters=on_removed, limit=1_000, raise_on_missing_output=False)
        assert held, "no task or actor ran on the removed node: the test removed an idle node"
    finally:
        cluster.shutdown()
    assert_same_as_reference(out, reference, corpus)
