"""The driver's pure parts: sizing the actor pool, exactly-once bookkeeping, the summary."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.tokenize import (
    ShardTracker,
    TokenizeConfig,
    io_task_options,
    plan_actors,
    summary_text,
)


def test_cpu_pool_always_leaves_cpu_for_decoding():
    # 2 CPUs: two single-thread encoders (every core can encode), reserving one CPU between them
    plan = plan_actors(2, 0, largest_node_cpus=2)
    assert (plan.num_actors, plan.cpus_per_actor, plan.num_threads) == (2, 0.5, 1)
    assert plan_actors(64, 0, cpus_per_actor=4).num_threads == 4
    with pytest.raises(ValueError, match="leaves no CPU"):
        plan_actors(2, 0, num_actors=2, cpus_per_actor=1)
    fractional = plan_actors(2, 0, num_actors=2, cpus_per_actor=0.5)
    assert fractional.num_actors == 2 and fractional.num_threads == 1
    # one CPU: the actor reserves nothing (the decode task needs the whole logical CPU), the OS shares it
    assert (plan_actors(1, 0).num_actors, plan_actors(1, 0).cpus_per_actor) == (1, 0.0)


@given(cpus=st.integers(1, 256), nodes=st.integers(1, 16), actors=st.one_of(st.none(), st.integers(1, 512)))
@settings(max_examples=200, deadline=None)
def test_cpu_pool_encodes_on_every_core_and_keeps_decode_slots(cpus, nodes, actors):
    """Whatever the cluster: one thread per CPU by default; the reservation leaves the decode tasks at
    least one CPU, half the CPUs when nothing else binds, and one CPU on the nodes left after the
    largest goes."""
    total = cpus * nodes
    try:
        plan = plan_actors(total, 0, largest_node_cpus=cpus, num_actors=actors)
    except ValueError:
        assert actors is not None  # only an explicit pool can be refused
        return
    reserved = plan.num_actors * plan.cpus_per_actor
    assert plan.num_threads == 1 and plan.gpus_per_actor == 0
    if actors is None:
        assert plan.num_actors == total
    assert reserved <= total / 2 + 1e-9
    assert total - reserved >= 1 - 1e-9
    if nodes > 1:
        assert (total - cpus) - reserved >= 1 - 1e-9 or plan.cpus_per_actor == 0
    assert plan.cpus_per_actor <= 1


def test_cpu_pool_survives_losing_the_largest_node():
    # 2 nodes x 2 CPUs: 4 actors of one thread; if a node goes, Ray restarts its actors on the other
    # node, and the pool must still leave that node a CPU for decoding.
    plan = plan_actors(4, 0, largest_node_cpus=2)
    assert (plan.num_actors, plan.num_threads, plan.cpus_per_actor) == (4, 1, 0.25)
    assert plan.num_actors * plan.cpus_per_actor <= 4 - 2 - 1
    big = plan_actors(64, 0, largest_node_cpus=16)  # 4 nodes: losing one costs little; half stays for decode
    assert (big.num_actors, big.cpus_per_actor) == (64, 0.5)
    ones = plan_actors(2, 0, largest_node_cpus=1)  # 2 nodes x 1 CPU: a node left alone keeps its CPU
    assert (ones.num_actors, ones.cpus_per_actor) == (2, 0.0)


def test_gpu_pool_is_one_actor_per_gpu():
    plan = plan_actors(32, 4, largest_node_cpus=32)
    assert (plan.num_actors, plan.gpus_per_actor, plan.cpus_per_actor) == (4, 1.0, 1.0)
    assert plan_actors(32, 4, gpus_per_actor=0.5).num_actors == 8
    assert plan_actors(32, 4, gpus_per_actor=0).gpus_per_actor == 0  # forced CPU
    assert not plan.autoscales and plan.smallest == 4  # a fixed-size cluster: a fixed pool, as before


def test_gpu_pool_grows_to_what_the_job_wants_as_gpu_nodes_arrive():
    # cluster.yaml: a head with CPU 0, no GPU node yet; --actors 16 --gpus-per-actor 1
    plan = plan_actors(0, 0, num_actors=16, gpus_per_actor=1)
    assert (plan.smallest, plan.num_actors, plan.gpus_per_actor, plan.cpus_per_actor) == (1, 16, 1.0, 1.0)
    assert plan.autoscales
    # one 8-GPU node up: start with the 8 actors it holds, grow to 16
    plan = plan_actors(8, 8, largest_node_cpus=8, num_actors=16)
    assert (plan.smallest, plan.num_actors) == (8, 16)
    half = plan_actors(0, 1, num_actors=4, gpus_per_actor=0.5)  # two actors share a GPU
    assert (half.smallest, half.num_actors) == (2, 4)
    # no GPU up and no --actors: one actor, waiting for the first GPU node
    lone = plan_actors(0, 0, gpus_per_actor=1)
    assert (lone.smallest, lone.num_actors, lone.autoscales) == (1, 1, False)
    # all wanted GPUs up: fixed, and the CPU check applies as on any fixed cluster
    with pytest.raises(ValueError, match="leaves no CPU"):
        plan_actors(2, 2, num_actors=2, cpus_per_actor=1)


def test_tracker_completes_each_shard_once_despite_duplicates():
    t = ShardTracker({"a": {0}, "b": set()})
    assert not t.update({"shard": "a", "indices": [1, 2], "total": -1})
    assert not t.update({"shard": "a", "indices": [2], "total": 4})  # a retried batch
    assert t.update({"shard": "a", "indices": [3], "total": -1})
    assert not t.update({"shard": "a", "indices": [3], "total": -1})  # late duplicate: not twice
    assert t.update({"shard": "b", "indices": [], "total": 0})  # an empty shard
    assert t.completed == ["a", "b"] and t.unfinished() == [] and t.processed == 3


@st.composite
def write_records(draw):
    """Write-stage records of a few shards, as Ray may deliver them: split into pieces in any way, the
    end marker in any piece, pieces retried (duplicated) and delivered in any order."""
    records, totals = [], {}
    for sid in ("a", "b", "c")[: draw(st.integers(1, 3))]:
        total = draw(st.integers(0, 8))
        totals[sid] = total
        indices = draw(st.permutations(range(total)))
        cuts = sorted(draw(st.sets(st.integers(1, max(1, total - 1)), max_size=3))) if total > 1 else []
        pieces = [list(indices[i:j]) for i, j in zip([0, *cuts], [*cuts, total])] or [[]]
        end = draw(st.integers(0, len(pieces) - 1))
        records += [{"shard": sid, "indices": p, "total": total if n == end else -1} for n, p in enumerate(pieces)]
    duplicates = draw(st.lists(st.sampled_from(records), max_size=6))
    return draw(st.permutations(records + duplicates)), totals


@settings(max_examples=300, deadline=None)
@given(write_records())
def test_tracker_completes_every_shard_exactly_once_in_any_delivery(case):
    records, totals = case
    tracker = ShardTracker({sid: set() for sid in totals})
    completions = []
    for n, record in enumerate(records):
        if tracker.update(record):
            completions.append(record["shard"])
            seen = {i for r in records[: n + 1] if r["shard"] == record["shard"] for i in r["indices"]}
            assert seen == set(range(totals[record["shard"]])), "completed before every index was staged"
    assert sorted(completions) == sorted(totals)  # each shard once: a late duplicate never completes it again
    assert tracker.unfinished() == [] and tracker.processed == sum(totals.values())


def test_tracker_reports_unfinished_shards():
    t = ShardTracker({"a": set()})
    t.update({"shard": "a", "indices": [0], "total": 3})
    assert t.unfinished() == ["a"] and t.describe("a") == "a (1/3)"


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TokenizeConfig(input="a", output="b", batch_size=0)
    with pytest.raises(ValueError, match="cpus_per_actor"):
        TokenizeConfig(input="a", output="b", cpus_per_actor=0)
    assert "secret" not in repr(TokenizeConfig(input="a", output="b", storage_options={"secret": "secret"}))


def test_summary_fits_one_screen():
    manifest = {
        "output": "/tmp/out", "counts": {"inputs": 10, "rows": 8, "errors": 2,
                                         "errors_by_kind": {"empty image": 1, "not an image": 1}},
        "run": {"samples_processed": 10, "shards_processed": 2, "shards_already_done": 0, "pipeline_time_s": 2.0,
                "images_per_s": 5.0, "wall_time_s": 9.0, "actors": 1, "cpus_per_actor": 1, "gpus_per_actor": 0,
                "batch_size": 64, "cluster": {"nodes": 1, "cpus": 2, "gpus": 0}},
        "model": {"checkpoint_id": "preset:tiny", "random_weights": True, "num_registers": 32, "codebook_size": 1000},
        "settings": {"max_tokens": 32}, "inputs": {"num_shards": 2, "format": "webdataset", "url": "/tmp/in"},
        "token_length_histogram": {"32": 8},
    }
    text = summary_text(manifest)
    assert len(text.splitlines()) < 25
    assert "5.0 images/s" in text and "empty image" in text and "RANDOM" in text


def test_write_tasks_avoid_nodes_without_cpus_and_reserve_none():
    head, gpu_a, gpu_b = "a" * 56, "b" * 56, "c" * 56
    node = lambda nid, res, alive=True: {"NodeID": nid, "Alive": alive, "Resources": res}  # noqa: E731
    # cluster.yaml: a head with CPU 0 (Ray leaves the key out), GPU workers with CPUs
    opts = io_task_options([node(head, {"memory": 1e9}), node(gpu_a, {"CPU": 16.0, "GPU": 1.0})])
    assert opts == {"num_cpus": 0, "label_selector": {"ray.io/node-id": f"!{head}"}}
    # several CPU-less nodes; a dead one is not named
    opts = io_task_options([node(head, {"CPU": 0.0}), node(gpu_a, {}), node(gpu_b, {}, alive=False)])
    assert opts["label_selector"] == {"ray.io/node-id": f"!in({head}, {gpu_a})"}
    # a laptop or a fixed cluster: every node has CPUs, nothing to avoid
    assert io_task_options([node(head, {"CPU": 2.0}), node(gpu_a, {"CPU": 2.0})]) == {"num_cpus": 0}
    # Ray accepts the selector as written
    from ray._private.label_utils import validate_label_selector

    assert validate_label_selector(io_task_options([node(head, {}), node(gpu_a, {})])["label_selector"]) is None
