"""The training streams' shard order: every epoch reads every row once, in a new seeded shard order,
and a resumed run gets an order of its own (on a local Ray instance, through `streaming_split` as Ray
Train reads them)."""

import contextlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data

from pipelines.corpus import build_corpus
from pipelines.schema import TOKEN_SCHEMA, file_metadata
from pipelines.sources import resolve_inputs
from pipelines.writer import OutputStore
from training.data import data_order_seed, image_dataset, inspect_tokens, token_dataset
from training.runs import latest_checkpoint_step

NUM_FILES = 6
ROWS_PER_FILE = 4
EPOCHS = 3


@contextlib.contextmanager
def ordered_execution():
    """Rows come out in task order, so a shard order shows in the row order (training keeps the default)."""
    options = ray.data.DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before


def epochs_of(ds, column: str, epochs: int = EPOCHS) -> list[list]:
    """Passes over `ds` the way a Ray Train worker makes them: one streaming_split shard, re-iterated."""
    (shard,) = ds.streaming_split(1, equal=True)
    return [[row[column] for row in shard.iter_rows()] for _ in range(epochs)]


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    """NUM_FILES token Parquet files; a row's label says which file it is in."""
    folder = tmp_path_factory.mktemp("order-tokens")
    md = file_metadata(checkpoint_id="preset:tiny", checkpoint_sha256=None, codebook_size=1000,
                       fsq_levels=(8, 5, 5, 5), max_tokens=32, image_size=32, class_names=())
    for f in range(NUM_FILES):
        n = ROWS_PER_FILE
        table = pa.Table.from_pydict({
            "key": [f"{f}-{i}" for i in range(n)], "tokens": pa.array([[f, i] for i in range(n)], pa.list_(pa.uint16())),
            "num_tokens": pa.array([2] * n, pa.uint16()), "label": pa.array([f] * n, pa.int32()),
            "caption": [None] * n, "source": ["t"] * n, "width": pa.array([32] * n, pa.int32()),
            "height": pa.array([32] * n, pa.int32()),
        }, schema=TOKEN_SCHEMA)
        pq.write_table(table.replace_schema_metadata(md), folder / f"part-{f:03d}.parquet")
    return folder


def file_order(labels: list[int]) -> list[int]:
    return list(dict.fromkeys(labels))


@pytest.mark.slow  # ~9 Parquet executions at several seconds each on 2 cores
def test_token_files_are_read_in_a_new_seeded_order_every_epoch(ray_local, token_files):
    store = OutputStore(str(token_files))
    data = inspect_tokens(store)
    with ordered_execution():
        first = epochs_of(token_dataset(store, data, "class", order_seed=11), "label")
        again = epochs_of(token_dataset(store, data, "class", order_seed=11), "label", 2)
        other = epochs_of(token_dataset(store, data, "class", order_seed=12), "label", 1)
        listed = epochs_of(token_dataset(store, data, "class"), "label", 1)
    everything = sorted(f for f in range(NUM_FILES) for _ in range(ROWS_PER_FILE))
    for epoch in first + other + listed:
        assert sorted(epoch) == everything  # every row once per epoch: nothing dropped, nothing doubled
    orders = [file_order(e) for e in first]
    assert len({tuple(o) for o in orders}) > 1, orders  # the shard order changes between epochs
    assert [file_order(e) for e in again] == orders[:2]  # ... reproducibly for a seed
    assert file_order(other[0]) != orders[0]  # ... and differently for another seed
    assert all(file_order(e) == list(range(NUM_FILES)) for e in listed)  # held-out data: listing order


def test_image_shards_are_read_in_a_new_seeded_order_every_epoch(ray_local, tmp_path):
    build_corpus("fashion-mnist", tmp_path / "corpus", limit=NUM_FILES * ROWS_PER_FILE, samples_per_shard=ROWS_PER_FILE)
    plan = resolve_inputs(str(tmp_path / "corpus"))
    assert len(plan.shards) == NUM_FILES
    with ordered_execution():
        epochs = epochs_of(image_dataset(plan, {}, 32, order_seed=5), "pixels")
        listed = epochs_of(image_dataset(plan, {}, 32), "pixels", 2)
    assert all(sorted(e) == sorted(listed[0]) for e in epochs)  # every image once per epoch
    assert len(set(listed[0])) == NUM_FILES * ROWS_PER_FILE
    assert len({tuple(e) for e in epochs}) > 1
    assert listed[0] == listed[1]  # held-out data: the plan's order


def test_a_resumed_run_reads_its_own_order(tmp_path):
    store = OutputStore(str(tmp_path))
    assert latest_checkpoint_step(store) == 0  # a fresh run
    for name in ("checkpoint_00000500", "checkpoint_00001500", "checkpoint_00001000"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # not a checkpoint
    assert latest_checkpoint_step(store) == 1500
    assert latest_checkpoint_step(OutputStore(str(tmp_path / "missing"))) == 0
    # (seed * 1,000,003 + resume step) mod 2^31, worked by hand: 3,000,009 and 3,001,509
    assert (data_order_seed(3, 0), data_order_seed(3, 1500)) == (3_000_009, 3_001_509)
    assert len({data_order_seed(3, 0), data_order_seed(3, 1500), data_order_seed(4, 0)}) == 3
