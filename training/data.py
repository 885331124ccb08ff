"""Training data: which rows each worker reads in which order, where it stands, and what a batch is.

Owns the row order and the data position (`RowStream`: a pure function of seed, epoch, rank and world
size, so a resumed run reads exactly the rows an uninterrupted one would), the corpora as units
(`TokenSource`: slices of `flextok tokenize`'s Parquet row groups; `ImageSource`: image files or
shards read and decoded by the pipeline's own stages), the seam to batching (`batch_stream`), the
Arrow-level collates and the held-out Ray Datasets. Does not own models or losses (`training.tasks`).

Why not Ray Data's `streaming_split` for the training stream: it hands blocks to whichever worker asks
first, so which rows a worker sees, and in which order, differs from run to run and no position can
be restored. Each worker instead reads its own deterministic share in threads, ahead of training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from training.runs import UnreadableDataError

log = logging.getLogger("training.data")

VAL = "val"  # the held-out dataset's name: given whole to the main worker, never split or shuffled
IGNORE_INDEX = -100  # padding of token batches; the generator's loss ignores it


# Collates (Arrow batches -> tensors, on Ray Data's prefetch threads) ------------------------------
def pad_token_lists(column: pa.Array | pa.ChunkedArray, pad_value: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """A ragged `list<uint16>` column -> (tokens (B, T) int64 padded with `pad_value`, lengths (B,)).

    Vectorised on the Arrow buffers (no per-row Python): T is the longest row; a null row is empty.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise TypeError(f"tokens must be an Arrow list column, got {column.type}")
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # (B,)
    width = int(lengths.max()) if len(lengths) else 0
    tokens = np.full((len(lengths), width), pad_value, dtype=np.int64)
    keep = np.arange(width)[None, :] < lengths[:, None]  # (B, T), True on real tokens, row-major order
    # flatten() honours the slice offset and skips null rows: exactly the real tokens, row by row.
    tokens[keep] = column.flatten().to_numpy(zero_copy_only=False)
    return tokens, lengths


class TokenCollate(ArrowBatchCollateFn):
    """Token rows -> {"tokens": (B, T) int64 padded with -100, "lengths", "label"?} (+ "caption" list)."""

    def __init__(self, *, labels: bool = False, captions: bool = False) -> None:
        self.labels, self.captions = labels, captions

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        tokens, lengths = pad_token_lists(batch.column("tokens"))
        out: dict[str, Any] = {"tokens": torch.from_numpy(tokens), "lengths": torch.from_numpy(lengths)}
        if self.labels:
            out["label"] = torch.from_numpy(batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64))
        if self.captions:
            out["caption"] = batch.column("caption").to_pylist()
        return out


class PixelCollate(ArrowBatchCollateFn):
    """Decoded rows (`pixels`: H*W*3 RGB bytes) -> {"pixels": (B, H, W, 3) uint8}."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        from pipelines.encode import pixels_to_array

        pixels = pixels_to_array(batch.column("pixels"), self.image_size)  # (B, H, W, 3), read-only view
        return {"pixels": torch.from_numpy(np.array(pixels))}


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# The row stream: which rows a worker reads, in which order, and where it is ----------------------
UNITS_PER_WINDOW = 16  # a shuffle window holds rows of at least this many units drawn from the whole corpus
MAX_UNIT_ROWS = 64  # token row groups are read in slices of at most this many rows
READ_THREADS = 4  # units read (and images decoded) at once by each worker, ahead of the training step
TOKEN_CACHE_BYTES = 512 << 20  # per worker process: decoded token row groups kept for later units and epochs


class RowSource(Protocol):
    """A training corpus cut into units, the pieces a worker reads whole (picklable, shipped to workers).

    `read` must be deterministic: the same units give the same rows in the same order.
    """

    num_units: int
    units_per_read: int  # consecutive units of the reading order read in one call

    def read(self, units: Sequence[int]) -> pa.Table: ...


@dataclass(frozen=True)
class Position:
    """Where a worker's row stream stands: `row` rows consumed of the shuffle window that starts at the
    `window`-th unit of this worker's share of `epoch` (see `epoch_units`)."""

    epoch: int = 0
    window: int = 0
    row: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.window, self.row]


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k % 2**64 for k in keys])


def epoch_units(num_units: int, *, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """The units worker `rank` of `world_size` reads in `epoch`, in reading order: a permutation of all
    units seeded by (seed, epoch), dealt round-robin. A pure function of its arguments."""
    return _rng(seed, 0x5EED, epoch).permutation(num_units)[rank::world_size]


def window_order(num_rows: int, *, seed: int, epoch: int, rank: int, world_size: int, window: int) -> np.ndarray:
    """The order in which a shuffle window's rows are consumed: a permutation seeded by where the window is."""
    return _rng(seed, 0x0DE2, epoch, rank, world_size, window).permutation(num_rows)


class RowStream:
    """One worker's endless stream of training rows, epoch after epoch, from a `Position`.

    Every epoch the corpus's units are permuted (seeded by `seed` and the epoch) and dealt round-robin to
    the workers (`epoch_units`); a worker reads its units in that order, `READ_THREADS` at a time ahead of
    training, cuts them into shuffle windows of at least `window_rows` rows (whole reads) and consumes
    each window in a seeded permutation (`window_order`). So the rows a worker sees are a pure function
    of (seed, epoch, rank, world size) and its position, and `position` after `take` is all a resumed
    run needs to continue with exactly the rows an uninterrupted run would have read. Memory: one window,
    the window being filled and the reads in flight. `window_rows=0`: units in their epoch order, unshuffled.
    """

    def __init__(self, source: RowSource, *, seed: int, rank: int, world_size: int, window_rows: int,
                 position: Position = Position(), read_threads: int = READ_THREADS) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} workers")
        if source.num_units < world_size:
            raise ValueError(f"the training data has {source.num_units} piece(s) to deal to {world_size} workers; "
                             "use fewer workers or more (smaller) files")
        self.source, self.seed, self.rank, self.world_size = source, seed, rank, world_size
        self.window_rows, self.read_threads = window_rows, read_threads
        self.position = position
        self._windows = self._iter_windows(position.epoch, position.window)
        self._table: pa.Table | None = None
        self._offset = 0
        self._skip = position.row  # rows of the first window consumed before the restart
        self._batches_in_epoch = int(position != Position(position.epoch))

    def _units(self, epoch: int) -> np.ndarray:
        return epoch_units(self.source.num_units, seed=self.seed, epoch=epoch, rank=self.rank,
                           world_size=self.world_size)

    def _reads(self, epoch: int, start: int) -> Iterator[tuple[int, int, pa.Table]]:
        """(epoch, index of the read's first unit in the epoch's order, rows), reading ahead in threads."""
        step = max(1, self.source.units_per_read)

        def plan() -> Iterator[tuple[int, int, list[int]]]:
            e, i = epoch, start
            while True:
                units = self._units(e)
                for j in range(i, len(units), step):
                    yield e, j, [int(u) for u in units[j:j + step]]
                e, i = e + 1, 0

        planned = plan()
        with ThreadPoolExecutor(self.read_threads, thread_name_prefix="flextok-read") as pool:
            pending: deque = deque()
            while True:
                while len(pending) <= self.read_threads:  # one read queued behind each thread
                    e, j, units = next(planned)
                    pending.append((e, j, pool.submit(self.source.read, units)))
                e, j, future = pending.popleft()
                yield e, j, future.result()

    def _iter_windows(self, epoch: int, start: int) -> Iterator[tuple[int, int, pa.Table | None]]:
        """(epoch, window start, shuffled rows), and (epoch, -1, None) at the end of each epoch."""
        parts: list[pa.Table] = []
        rows, w_epoch, w_start = 0, epoch, start
        for e, j, table in self._reads(epoch, start):
            if e != w_epoch:
                if parts:
                    yield w_epoch, w_start, self._shuffle(w_epoch, w_start, parts)
                yield w_epoch, -1, None
                parts, rows, w_epoch, w_start = [], 0, e, j
            parts.append(table)
            rows += table.num_rows
            if rows >= self.window_rows:
                yield w_epoch, w_start, self._shuffle(w_epoch, w_start, parts)
                parts, rows, w_start = [], 0, j + max(1, self.source.units_per_read)

    def _shuffle(self, epoch: int, start: int, parts: list[pa.Table]) -> pa.Table:
        table = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
        if not self.window_rows:
            return table
        order = window_order(table.num_rows, seed=self.seed, epoch=epoch, rank=self.rank,
                             world_size=self.world_size, window=start)
        return table.take(pa.array(order))

    def take(self, num_rows: int) -> pa.Table:
        """The next `num_rows` rows, consumed. Rows left at the end of an epoch that do not make
        `num_rows` are dropped (every batch comes from one epoch, as with `drop_last`)."""
        out: list[pa.Table] = []
        need = num_rows
        while need:
            if self._table is None or self._offset >= self._table.num_rows:
                epoch, start, table = next(self._windows)
                if table is None:  # the epoch ended
                    if not self._batches_in_epoch:
                        raise ValueError(f"the training data has fewer than {num_rows} usable rows per worker; "
                                         "lower --batch-size or add data")
                    out, need = [], num_rows
                    self._table, self._batches_in_epoch = None, 0
                    self.position = Position(epoch + 1)
                    continue
                self._table, self._offset = table, min(self._skip, table.num_rows)
                self._skip = 0
                self.position = Position(epoch, start, self._offset)
            count = min(need, self._table.num_rows - self._offset)
            out.append(self._table.slice(self._offset, count))
            self._offset += count
            need -= count
            self.position = dataclasses.replace(self.position, row=self._offset)
        self._batches_in_epoch += 1
        return pa.concat_tables(out) if len(out) > 1 else out[0]


def check_world_size(saved: dict[str, Any] | None, world: int) -> None:
    """A checkpoint's data positions (`Trainer.data_position`) resume only on the world size that wrote them."""
    if saved is not None and saved["world_size"] != world:
        raise ValueError(f"this run was trained on {saved['world_size']} worker(s) and its data position is per "
                         f"worker; resume it with --workers {saved['world_size']}, or start a new --output")


def resume_position(saved: dict[str, Any] | None, num_units: int, rank: int, world: int, step: int) -> Position:
    """This worker's position from a checkpoint's data positions (the start of the data for a fresh run).

    The rows of an epoch are dealt per worker: another world size would read other rows, so it is refused.
    """
    if saved is None:
        if step:
            log.warning("the checkpoint at step %d holds no data position (written before it was recorded): "
                        "the data starts from the top", step)
        return Position()
    check_world_size(saved, world)
    epoch, window, row = saved["positions"][rank]
    if saved["num_units"] != num_units:
        log.warning("the training data has changed since the checkpoint (%d pieces, %d then): the run goes on "
                    "from the next epoch, not from the exact rows", num_units, saved["num_units"])
        return Position(epoch + 1)
    return Position(epoch, window, row)


class _Prefetch:
    """Runs an iterator in a daemon thread, `depth` items ahead; its exception is raised to the consumer."""

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        threading.Thread(target=self._run, args=(items,), daemon=True, name="flextok-batches").start()

    def _put(self, item: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put((False, e))

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self) -> Any:
        ok, item = self._queue.get()
        if not ok:
            raise item
        return item

    def close(self) -> None:
        self._stop.set()


def prefetched(items: Iterator[Any], depth: int = 2) -> _Prefetch:
    """Any stream of (batch, position) pairs made in a thread `depth` items ahead, as `batch_stream`'s are."""
    return _Prefetch(items, depth)


def batch_stream(stream: RowStream, collate: Any, batch_size: int, *, pin_memory: bool = False,
                 depth: int = 2) -> _Prefetch:
    """The row stream as (batch, position after it) pairs, collated in a thread `depth` batches ahead.

    The seam between row order (`RowStream`, owned here) and batching: a batcher takes rows with
    `stream.take(n)` and pairs each batch with `stream.position` right after it, which is what a
    checkpoint records (rows the batcher holds back are not covered by the position).
    """
    def batches() -> Iterator[tuple[Any, Position]]:
        while True:
            batch = collate(stream.take(batch_size))
            if pin_memory:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            yield batch, stream.position

    return _Prefetch(batches(), depth)


# Token rows (`flextok tokenize` output) ----------------------------------------------------------
@dataclass(frozen=True)
class TokenData:
    """What the driver learns about DST from the Parquet footers alone."""

    paths: list[str]
    num_rows: int
    metadata: dict[str, Any]
    max_label: int | None
    has_captions: bool  # some row has a caption (not only a caption column of nulls)
    min_label: int | None = None
    row_groups: tuple[tuple[int, ...], ...] = ()  # rows in each row group, per file


def inspect_tokens(store) -> TokenData:
    """List DST's part files and read their footers: schema metadata, row counts, label statistics."""

    from pipelines.schema import read_file_metadata

    names = [n for n in store.listdir("") if n.startswith("part-") and n.endswith(".parquet")]
    if not names:
        raise FileNotFoundError(f"no token files (part-*.parquet) in {store.url}; run `flextok tokenize` first")
    metadata: dict[str, Any] | None = None
    num_rows, label_range, has_captions, row_groups = 0, None, False, []
    for name in names:
        with store.fs.open(store.path(name), "rb") as f:
            pf = _token_file(f, f"{store.url.rstrip('/')}/{name}")
            md = read_file_metadata(pf.schema_arrow)
            names_in_file = pf.schema_arrow.names
            if "tokens" not in names_in_file:
                raise ValueError(f"{name} has no `tokens` column; not a flextok token file")
            if metadata is None:
                metadata = md
            for key in ("checkpoint_sha256", "checkpoint_id", "codebook_size", "max_tokens"):
                if md.get(key) != metadata.get(key):
                    raise ValueError(f"{name} was tokenized with {key}={md.get(key)!r}, other files with "
                                     f"{metadata.get(key)!r}; one token dataset must come from one tokenizer")
            num_rows += pf.metadata.num_rows
            row_groups.append(tuple(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)))
            try:  # footers only, unless a file's statistics are missing
                if "label" in names_in_file:
                    label_range = _label_range(pf, names_in_file.index("label"), label_range)
                if "caption" in names_in_file and not has_captions:
                    has_captions = _has_values(pf, names_in_file.index("caption"))
            except Exception as e:
                if (corrupt := _unreadable(e, f"{store.url.rstrip('/')}/{name}", "a row group")) is None:
                    raise
                raise corrupt from e
    assert metadata is not None, "no files"
    for key in ("codebook_size", "max_tokens"):
        if key not in metadata:
            raise ValueError(f"{store.url} carries no flextok metadata ({key}); tokens must come from `flextok tokenize`")
    low, high = label_range if label_range is not None else (None, None)
    return TokenData([store.path(n) for n in names], num_rows, metadata, high, has_captions, low, tuple(row_groups))


def _token_file(f, url: str):
    """`pq.ParquetFile` of an open token file; one line naming it when it is not Parquet (a truncated
    copy, a killed writer's leftover, garbage). A storage fault is raised as it is (not the file's)."""
    import pyarrow.parquet as pq

    from pipelines import retry
    from pipelines.storage import redact_url

    try:
        return pq.ParquetFile(f)
    except Exception as e:
        if retry.classify(e) is not None:
            raise
        raise ValueError(f"{redact_url(url)} is not a readable Parquet file (truncated or corrupt): {e}") from None


def _unreadable(error: BaseException, url: str, where: str) -> UnreadableDataError | None:
    """`error` from reading a token file's pages as the file's own fault (a corrupt page, a torn copy:
    Arrow's ArrowInvalid or OSError), one line naming it; None for a storage fault or a missing file."""
    from pipelines import retry
    from pipelines.storage import redact_url

    if retry.classify(error) is not None or isinstance(error, FileNotFoundError) \
            or not isinstance(error, (pa.ArrowException, OSError)):
        return None
    text = " ".join(str(error).split())
    return UnreadableDataError(f"{redact_url(url)} is corrupt ({where} cannot be read: {text}); "
                               "tokenize its images again or remove it")


def _label_range(pf, column: int, current: tuple[int, int] | None) -> tuple[int, int] | None:
    """(smallest, largest) label from the row-group statistics (the column itself when they are missing)."""
    for i in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(i).column(column).statistics
        if stats is not None and stats.has_min_max:
            low, high = int(stats.min), int(stats.max)
        elif stats is not None and stats.null_count == pf.metadata.row_group(i).num_rows:
            continue
        else:
            found = pc.min_max(pf.read_row_group(i, columns=["label"])["label"]).as_py()
            if found["min"] is None:
                continue
            low, high = found["min"], found["max"]
        current = (low, high) if current is None else (min(current[0], low), max(current[1], high))
    return current


def _has_values(pf, column: int) -> bool:
    """Whether a column holds any non-null value (from the statistics, else the column itself)."""
    for i in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(i)
        stats = group.column(column).statistics
        if stats is not None and stats.has_null_count:
            if stats.null_count < group.num_rows:
                return True
        elif pf.read_row_group(i, columns=[pf.schema_arrow.names[column]]).column(0).null_count < group.num_rows:
            return True
    return False


def conditioned_rows(batch, *, column: str):
    """Token rows that carry their condition (a label or a caption); the others are dropped."""
    return batch.filter(pc.is_valid(batch[column]))


def chosen_prefixes(batch: pa.Table) -> pa.Table:
    """Rows of an `--adaptive-keep-all` run (all K tokens) cut to their chosen prefix (`chosen_num_tokens`).

    Vectorised on the Arrow buffers; a chosen length outside 1..num_tokens is a ValueError (not flextok data).
    """
    tokens = batch.column("tokens").combine_chunks()
    chosen = batch.column("chosen_num_tokens").to_numpy(zero_copy_only=False).astype(np.int64)  # (B,)
    lengths = pc.list_value_length(tokens).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(chosen) and not ((chosen >= 1) & (chosen <= lengths)).all():
        raise ValueError("chosen_num_tokens must be 1..num_tokens in every row of an adaptive token file")
    values = tokens.flatten()
    row = pc.list_parent_indices(tokens).to_numpy(zero_copy_only=False)  # each value's row
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    keep = np.arange(len(values)) - starts[row] < chosen[row]
    offsets = pa.array(np.concatenate([[0], np.cumsum(chosen)]).astype(np.int32))
    cut = pa.ListArray.from_arrays(offsets, values.filter(pa.array(keep)), type=tokens.type)
    return batch.set_column(batch.schema.get_field_index("tokens"), "tokens", cut).drop_columns(["chosen_num_tokens"])


def token_dataset(store, data: TokenData, cond: str, *, chosen_prefix: bool = False):
    """Ray Dataset of (tokens, label | caption) rows of DST's Parquet files in listing order (held-out data).

    `chosen_prefix` cuts the rows of an `--adaptive-keep-all` run to the prefix length chosen for each (an
    EOS generator learns to stop there).
    """
    import pyarrow.fs
    import ray.data

    column = "label" if cond == "class" else "caption"
    filesystem = None if store.is_local else pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))
    columns = ["tokens", column] + (["chosen_num_tokens"] if chosen_prefix else [])
    ds = ray.data.read_parquet(data.paths, filesystem=filesystem).select_columns(columns)
    if chosen_prefix:
        ds = ds.map_batches(chosen_prefixes, batch_format="pyarrow")
    return ds.map_batches(conditioned_rows, batch_format="pyarrow", fn_kwargs={"column": column})


def unit_rows(window_rows: int) -> int | None:
    """Rows per unit of a token row group: a window mixes >= UNITS_PER_WINDOW units, and window / MAX_UNIT_ROWS
    of them in large windows (a window of 65,536 rows mixes 1,024 pieces of the corpus)."""
    return min(-(-window_rows // UNITS_PER_WINDOW), MAX_UNIT_ROWS) if window_rows else None


_STORES: dict[str, Any] = {}  # per process: url + options -> OutputStore
_ROW_GROUPS: OrderedDict[tuple, pa.Table] = OrderedDict()  # LRU of decoded row groups
_CACHE_LOCK = threading.Lock()


def _store(url: str, storage_options: Mapping[str, Any]):
    from pipelines.writer import OutputStore

    key = json.dumps([url, storage_options], sort_keys=True, default=str)
    with _CACHE_LOCK:
        if key not in _STORES:
            _STORES[key] = OutputStore(url, dict(storage_options))
        return _STORES[key]


@dataclass(frozen=True)
class TokenSource:
    """Token rows of `flextok tokenize`'s Parquet files as units: slices of at most `unit_rows` rows of
    one row group, so that a shuffle window mixes many files even when each file holds one class.

    A row group is read whole for any of its slices and kept in a per-process LRU cache of
    `TOKEN_CACHE_BYTES`, so a worker whose share of the corpus fits reads each file once per run.
    """

    url: str
    storage_options: Mapping[str, Any]
    paths: tuple[str, ...]
    column: str  # "label" or "caption": rows without it are dropped
    units: tuple[tuple[int, int, int, int], ...]  # (file, row group, first row, rows)
    units_per_read: int = 1
    chosen_prefix: bool = False  # cut `--adaptive-keep-all` rows to their chosen prefix (`chosen_prefixes`)

    @property
    def num_units(self) -> int:
        return len(self.units)

    def _row_group(self, file: int, group: int) -> pa.Table:
        import pyarrow.parquet as pq

        key = (self.paths[file], group, self.column, self.url, self.chosen_prefix)
        with _CACHE_LOCK:
            if key in _ROW_GROUPS:
                _ROW_GROUPS.move_to_end(key)
                return _ROW_GROUPS[key]
        from pipelines.retry import call_with_retries

        fs = _store(self.url, self.storage_options).fs

        columns = ["tokens", self.column] + (["chosen_num_tokens"] if self.chosen_prefix else [])

        def read() -> pa.Table:
            with fs.open(self.paths[file], "rb") as f:
                pf = pq.ParquetFile(f)
                try:
                    return pf.read_row_group(group, columns=columns)
                except Exception as e:
                    if (corrupt := _unreadable(e, self.paths[file], f"row group {group}")) is None:
                        raise
                    raise corrupt from e

        table = call_with_retries(read, what=f"reading {self.paths[file]}")  # storage faults retried, never data
        with _CACHE_LOCK:
            _ROW_GROUPS[key] = table
            total = sum(t.nbytes for t in _ROW_GROUPS.values())
            while total > TOKEN_CACHE_BYTES and len(_ROW_GROUPS) > 1:
                total -= _ROW_GROUPS.popitem(last=False)[1].nbytes
        return table

    def read(self, units: Sequence[int]) -> pa.Table:
        parts = []
        for u in units:
            file, group, first, rows = self.units[u]
            parts.append(self._row_group(file, group).slice(first, rows))
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if self.chosen_prefix:
            table = chosen_prefixes(table)
        return conditioned_rows(table, column=self.column)


def token_source(url: str, storage_options: Mapping[str, Any], data: TokenData, cond: str,
                 window_rows: int, *, chosen_prefix: bool = False) -> TokenSource:
    """DST's token files (`inspect_tokens`) as a `TokenSource` for shuffle windows of `window_rows` rows."""
    size = unit_rows(window_rows)
    units = []
    for file, groups in enumerate(data.row_groups):
        for group, rows in enumerate(groups):
            step = size or max(rows, 1)
            units += [(file, group, first, min(step, rows - first)) for first in range(0, rows, step)]
    return TokenSource(url=url, storage_options=dict(storage_options), paths=tuple(data.paths),
                       column="label" if cond == "class" else "caption", units=tuple(units),
                       chosen_prefix=chosen_prefix)


# Images (the pipeline's read and decode stages) ------------------------------------------------
class _SkipLog:
    """Per process: report undecodable samples without a line per batch and epoch. The same samples come
    back every epoch, so only ones not seen before count; the first is logged at once, the rest at most
    every `every_s` seconds as a count."""

    def __init__(self, every_s: float = 300.0, remember: int = 100_000) -> None:
        self.every_s, self.remember = every_s, remember
        self.seen: set[str] = set()
        self.pending, self.total, self.example = 0, 0, ""
        self.last_log: float | None = None

    def add(self, keys: list[str], errors: list[str], now: float) -> str | None:
        """Record skipped samples; returns the line to log, if one is due."""
        for key, error in zip(keys, errors):
            if key in self.seen:
                continue
            if len(self.seen) < self.remember:
                self.seen.add(key)
            self.pending += 1
            self.example = self.example or f"{key}: {error}"
        if not self.pending or (self.last_log is not None and now - self.last_log < self.every_s):
            return None
        self.total += self.pending
        line = (f"skipping undecodable samples, e.g. {self.example}" if self.last_log is None else
                f"skipped {self.pending} more undecodable samples ({self.total} in this process)")
        self.pending, self.last_log = 0, now
        return line


_SKIPS = _SkipLog()
_SKIP_LOCK = threading.Lock()  # the training stream decodes in several reader threads
FOLDER_FILES_PER_READ = 32  # image-folder units (single files) read and decoded in one call


def training_rows(batch):
    """Decoded rows -> the pixels (and labels) of the good ones (errors and shard end markers dropped)."""
    failed = batch.filter(pc.and_(pc.is_valid(batch["error"]), pc.less(batch["index"], 0)))
    if failed.num_rows:
        # read_shard's failure marker: storage stayed unreachable through its retries. Training on
        # without the rest of the shard would quietly change the data (and break exact resume), so the
        # worker fails: Ray Train restarts it from the last checkpoint, which reads the shard again.
        raise ConnectionError(f"shard {failed['shard'][0].as_py()}: {failed['error'][0].as_py()}; "
                              "training does not go on without it (restarting from the last checkpoint)")
    ok = batch.filter(pc.and_(pc.is_null(batch["error"]), pc.greater_equal(batch["index"], 0)))
    # Samples with an error (bad data: skipped and counted); end markers are not samples.
    bad = batch.filter(pc.and_(pc.is_valid(batch["error"]), pc.greater_equal(batch["index"], 0)))
    if bad.num_rows:
        with _SKIP_LOCK:
            line = _SKIPS.add(bad["key"].to_pylist(), bad["error"].to_pylist(), time.monotonic())
        if line is not None:
            log.warning("%s", line)
    return ok.select(["pixels", "label"])


@functools.lru_cache(maxsize=1024)
def _shard(text: str):
    from pipelines.sources import Shard

    return Shard.from_json(text)


@dataclass(frozen=True)
class ImageSource:
    """Decoded training images as units: single files of an image folder (so a shuffle window is a
    uniform draw from the whole corpus, however its class sub-folders sort), whole WebDataset or
    Parquet shards otherwise (they are read front to back). Read with the pipeline's own stages."""

    shards: tuple[str, ...]  # Shard JSON
    storage_options: Mapping[str, Any]
    image_size: int
    units: tuple[tuple[int, int], ...]  # (shard, file) for image folders, (shard, -1) for a whole shard
    units_per_read: int = 1

    @property
    def num_units(self) -> int:
        return len(self.units)

    def read(self, units: Sequence[int]) -> pa.Table:
        import dataclasses as dc

        from pipelines.decode import decode_batch
        from pipelines.sources import read_shard

        shards: list[Any] = []
        files: list[tuple[Any, int]] = []  # image-folder files of this read, merged into one shard
        for u in units:
            s, f = self.units[u]
            shard = _shard(self.shards[s])
            if f < 0:
                shards.append(shard)
            else:
                files.append((shard, f))
        if files:
            first = files[0][0]
            shards.append(dc.replace(
                first, id=f"{first.id}+{len(files)}", files=tuple(sh.files[f] for sh, f in files),
                keys=tuple(sh.keys[f] for sh, f in files), labels=tuple(sh.labels[f] for sh, f in files)))
        parts = [training_rows(decode_batch(table, image_size=self.image_size))
                 for shard in shards for table in read_shard(shard, self.storage_options)]
        return pa.concat_tables(parts)


def image_source(plan, storage_options: Mapping[str, Any], image_size: int) -> ImageSource:
    """An input plan (`pipelines.sources.resolve_inputs`) as an `ImageSource`."""
    units: list[tuple[int, int]] = []
    for s, shard in enumerate(plan.shards):
        units += [(s, f) for f in range(len(shard.files))] if shard.format == "images" else [(s, -1)]
    per_read = FOLDER_FILES_PER_READ if plan.format == "images" else 1
    return ImageSource(shards=tuple(sh.to_json() for sh in plan.shards), storage_options=dict(storage_options),
                       image_size=image_size, units=tuple(units), units_per_read=per_read)


def image_dataset(plan, storage_options: dict, image_size: int):
    """Ray Dataset of decoded images in the plan's order (held-out data): the pipeline's stages, reused."""
    import ray.data

    from pipelines.decode import decode_batch
    from pipelines.sources import read_shard_batch

    items = [{"shard": shard.to_json(), "skip": None} for shard in plan.shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block per shard
    ds = ds.map_batches(read_shard_batch, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"storage_options": storage_options})
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", fn_kwargs={"image_size": image_size})
    return ds.map_batches(training_rows, batch_format="pyarrow")
