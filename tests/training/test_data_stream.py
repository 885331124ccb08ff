"""The training row stream: a pure function of (seed, epoch, rank, world size), resumable from its
position exactly, and mixing class-sorted corpora (token files written in class order, an image folder
with one sub-folder per class) into batches whose labels look like a uniform draw."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.corpus import FASHION_MNIST_CLASSES, fashion_mnist_samples
from pipelines.schema import TOKEN_SCHEMA, file_metadata
from pipelines.sources import resolve_inputs
from pipelines.writer import OutputStore
from training.data import (
    Position,
    RowStream,
    TokenCollate,
    batch_stream,
    epoch_units,
    image_source,
    inspect_tokens,
    resume_position,
    token_source,
    unit_rows,
)

NUM_CLASSES = 10
ROWS_PER_FILE = 40


def write_token_files(folder, rows_per_file: int = ROWS_PER_FILE, row_group_size: int | None = None) -> None:
    """One file per class, written in class order (the worst case for mixing); tokens [file, row] name a row."""
    md = file_metadata(checkpoint_id="preset:tiny", checkpoint_sha256=None, codebook_size=1000,
                       fsq_levels=(8, 5, 5, 5), max_tokens=32, image_size=32, class_names=())
    for f in range(NUM_CLASSES):
        n = rows_per_file
        table = pa.Table.from_pydict({
            "key": [f"{f}-{i}" for i in range(n)], "tokens": pa.array([[f, i] for i in range(n)], pa.list_(pa.uint16())),
            "num_tokens": pa.array([2] * n, pa.uint16()), "label": pa.array([f] * n, pa.int32()),
            "caption": [None] * n, "source": ["t"] * n, "width": pa.array([32] * n, pa.int32()),
            "height": pa.array([32] * n, pa.int32()),
        }, schema=TOKEN_SCHEMA)
        pq.write_table(table.replace_schema_metadata(md), folder / f"part-{f:03d}.parquet",
                       row_group_size=row_group_size)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sorted-tokens")
    write_token_files(folder, row_group_size=25)  # two row groups per file (25 + 15 rows)
    return folder, inspect_tokens(OutputStore(str(folder)))


def source_of(tokens, window_rows: int):
    folder, data = tokens
    return token_source(str(folder), {}, data, "class", window_rows)


def row_ids(table: pa.Table) -> list[tuple[int, int]]:
    return [tuple(t) for t in table.column("tokens").to_pylist()]


def test_units_are_dealt_once_per_epoch_in_a_new_order():
    parts = [epoch_units(23, seed=4, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(23))  # every unit to exactly one worker
    assert [len(p) for p in parts] == [8, 8, 7]
    again = epoch_units(23, seed=4, epoch=0, rank=1, world_size=3)
    assert np.array_equal(again, parts[1])  # a pure function
    assert not np.array_equal(epoch_units(23, seed=4, epoch=1, rank=0, world_size=1),
                              epoch_units(23, seed=4, epoch=0, rank=0, world_size=1))
    assert not np.array_equal(epoch_units(23, seed=5, epoch=0, rank=0, world_size=1),
                              epoch_units(23, seed=4, epoch=0, rank=0, world_size=1))


def test_token_units_are_row_group_slices(tokens):
    _, data = tokens
    assert data.row_groups == ((25, 15),) * NUM_CLASSES
    source = source_of(tokens, 64)  # 64 rows per window / 16 units -> slices of at most 4 rows
    assert source.num_units == NUM_CLASSES * (7 + 4)  # 25 rows -> 7 slices, 15 -> 4
    assert {u[3] for u in source.units} == {4, 1, 3}
    assert (unit_rows(100), unit_rows(1024), unit_rows(65536), unit_rows(0)) == (7, 64, 64, None)  # >= 16 per window
    whole = source_of(tokens, 0)  # no shuffle: a unit is a whole row group
    assert [u[3] for u in whole.units[:2]] == [25, 15]
    assert row_ids(source.read([0, 1])) == [(0, i) for i in range(8)]


def test_every_row_once_per_epoch_over_the_workers(tokens):
    source = source_of(tokens, 64)
    seen = []
    for rank in range(3):
        stream = RowStream(source, seed=1, rank=rank, world_size=3, window_rows=64)
        mine = epoch_units(source.num_units, seed=1, epoch=0, rank=rank, world_size=3)
        count = sum(source.units[u][3] for u in mine)
        rows = row_ids(stream.take(count))
        assert stream.position.epoch == 0
        assert sorted(rows) == sorted(row_ids(source.read(mine.tolist())))  # exactly its units' rows
        assert rows != row_ids(source.read(mine.tolist()))  # ... shuffled
        stream.take(1)
        assert stream.position.epoch == 1
        seen += rows
    assert sorted(seen) == sorted((f, i) for f in range(NUM_CLASSES) for i in range(ROWS_PER_FILE))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**40), world=st.integers(1, 3), window=st.sampled_from([0, 8, 64, 500]),
       batch=st.integers(1, 24), cut=st.integers(0, 40))
def test_a_stream_restarted_from_its_position_reads_the_same_rows(tokens, seed, world, window, batch, cut):
    """Restarted after `cut` batches (across windows and epochs: 400 rows, 1-3 workers), the stream
    continues with exactly the batches of the one that was not stopped."""
    source = source_of(tokens, window)
    rank = world - 1
    whole = RowStream(source, seed=seed, rank=rank, world_size=world, window_rows=window)
    first = RowStream(source, seed=seed, rank=rank, world_size=world, window_rows=window)
    for _ in range(cut):
        first.take(batch)
    restarted = RowStream(source, seed=seed, rank=rank, world_size=world, window_rows=window,
                          position=first.position)
    expected = [row_ids(whole.take(batch)) for _ in range(cut + 12)][cut:]
    assert [row_ids(restarted.take(batch)) for _ in range(12)] == expected


def test_batches_carry_the_position_after_them(tokens):
    source = source_of(tokens, 64)
    batches = batch_stream(RowStream(source, seed=0, rank=0, world_size=1, window_rows=64), TokenCollate(labels=True), 6)
    try:
        pairs = [next(batches) for _ in range(5)]
    finally:
        batches.close()
    position = pairs[2][1]
    restarted = RowStream(source, seed=0, rank=0, world_size=1, window_rows=64, position=position)
    following = TokenCollate(labels=True)(restarted.take(6))
    assert following["tokens"].tolist() == pairs[3][0]["tokens"].tolist()
    assert isinstance(position, Position) and position != pairs[3][1]


def test_too_few_rows_or_pieces_are_one_line_errors(tokens):
    source = source_of(tokens, 0)
    with pytest.raises(ValueError, match="fewer than 1000 usable rows per worker"):
        RowStream(source, seed=0, rank=0, world_size=2, window_rows=0).take(1000)
    with pytest.raises(ValueError, match="20 piece\\(s\\) to deal to 21 workers"):
        RowStream(source, seed=0, rank=0, world_size=21, window_rows=0)


# Mixing ----------------------------------------------------------------------------------------
def plug_in_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the labels' empirical distribution."""
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def uniform_draw_entropy(class_counts: np.ndarray, batch: int, draws: int = 4000) -> float:
    """Mean plug-in entropy of `batch` labels drawn uniformly without replacement from the corpus:
    what a perfectly shuffled stream gives (Monte Carlo, independent of the stream's code)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(class_counts)), class_counts)
    return float(np.mean([plug_in_entropy(rng.choice(labels, batch, replace=False)) for _ in range(draws)]))


def mean_batch_entropy(source, *, window: int, batch: int, batches: int, world: int = 2) -> float:
    values = []
    for rank in range(world):
        stream = RowStream(source, seed=7, rank=rank, world_size=world, window_rows=window)
        values += [plug_in_entropy(stream.take(batch).column("label").to_numpy()) for _ in range(batches)]
    return float(np.mean(values))


# The bound: a batch of B rows drawn uniformly from the corpus has a plug-in label entropy of H_B on
# average (below log 10 = 2.30, since B = 16 rows rarely cover 10 classes evenly; H_B is ~1.99 here). A
# stream that mixes many files per window comes within 10% of it; one that reads files in order
# (window 0, class-sorted files) gives batches of 1-2 classes, at most log 2 = 0.69.
def test_class_sorted_token_files_give_mixed_batches(tokens):
    reference = uniform_draw_entropy(np.full(NUM_CLASSES, ROWS_PER_FILE), 16)
    assert 1.8 < reference < np.log(NUM_CLASSES)
    mixed = mean_batch_entropy(source_of(tokens, 128), window=128, batch=16, batches=10)
    assert mixed > 0.9 * reference, (mixed, reference)
    sorted_reads = mean_batch_entropy(source_of(tokens, 0), window=0, batch=16, batches=10)
    assert sorted_reads < np.log(2) + 1e-9, sorted_reads


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Real Fashion-MNIST photos in an image folder with one sub-folder per class (so its shards,
    listed in path order, are class-sorted), 12 per class."""
    folder = tmp_path_factory.mktemp("image-folder")
    counts = [0] * NUM_CLASSES
    for sample in fashion_mnist_samples(limit=1000):
        if counts[sample.label] < 12:
            name = FASHION_MNIST_CLASSES[sample.label].replace("/", "-")
            path = folder / f"{sample.label}-{name}" / f"{sample.key}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(sample.png)
            counts[sample.label] += 1
    assert counts == [12] * NUM_CLASSES
    return folder


def test_a_class_sorted_image_folder_gives_mixed_batches(image_folder):
    plan = resolve_inputs(str(image_folder))
    listed = [label for shard in plan.shards for label in shard.labels]
    assert plan.format == "images" and listed == sorted(listed)  # the corpus is listed class by class
    source = image_source(plan, {}, 32)
    assert source.num_units == 120  # every file is a unit
    rows = source.read([0, 1])
    assert rows.column_names == ["pixels", "label"] and len(rows.column("pixels")[0].as_py()) == 32 * 32 * 3
    reference = uniform_draw_entropy(np.full(NUM_CLASSES, 12), 16)
    mixed = mean_batch_entropy(source, window=32, batch=16, batches=3)
    assert mixed > 0.9 * reference, (mixed, reference)


def test_a_checkpoint_position_resumes_on_its_own_world_size_only():
    saved = {"world_size": 2, "num_units": 110, "positions": [[3, 40, 5], [3, 44, 0]]}
    assert resume_position(saved, 110, 1, 2, step=9) == Position(3, 44, 0)
    with pytest.raises(ValueError, match="trained on 2 worker\\(s\\).*resume it with --workers 2"):
        resume_position(saved, 110, 0, 3, step=9)
    assert resume_position(saved, 120, 0, 2, step=9) == Position(4)  # other data: the next epoch, from its top
    assert resume_position(None, 110, 0, 4, step=9) == Position()  # a checkpoint from before positions
