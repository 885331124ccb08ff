"""Training data: the Ray Datasets a task reads, Arrow-level collates and the per-worker batch stream.

Owns what a batch is (the collates, on Ray Data's prefetch threads), how rows are ordered (seeded
per-epoch shard shuffles, a local shuffle buffer) and the datasets of both tasks: decoded images
read by the pipeline's own stages, and token rows read from `flextok tokenize`'s Parquet. Batching
lives here and only here. Does not own models or losses (`training.tasks`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from training.settings import TrainConfig

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


# The stream of batches -------------------------------------------------------------------------
def batch_stream(shard, task: Any, cfg: TrainConfig, seed: int, use_gpu: bool) -> Iterator[Any]:
    """The worker's shard as an endless stream of full batches, epoch after epoch (reshuffled)."""
    epoch = 0
    buffer = max(cfg.shuffle_buffer, cfg.worker_batch_size) if cfg.shuffle_buffer else None
    while True:
        count = 0
        for batch in shard.iter_torch_batches(
            batch_size=cfg.micro_batch_size, collate_fn=task.collate_fn(), drop_last=True,
            local_shuffle_buffer_size=buffer, local_shuffle_seed=(seed + epoch) if buffer else None,
            prefetch_batches=2, pin_memory=use_gpu,
        ):
            count += 1
            yield batch
        if count == 0:
            raise ValueError(
                f"the training data has fewer than {cfg.micro_batch_size} usable rows per worker; "
                "lower --batch-size or add data"
            )
        epoch += 1


def data_order_seed(seed: int, resume_step: int) -> int:
    """The seed of the training stream's shard order: from --seed, and from the step a resumed run starts at.

    Each job shuffles its shards (files) with it through Ray Data's seeded, re-seeded-every-execution
    shuffles, so every epoch reads the shards in a new order (a sorted corpus is not read sorted) and
    the same command reads the same orders. A resumed run does not know where in its epoch it stopped
    (the data position is not in the checkpoint); seeding by its step at least starts it on an order
    of its own rather than replaying the first run's first epoch from the top.
    """
    return (seed * 1_000_003 + resume_step) % 2**31


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


def inspect_tokens(store) -> TokenData:
    """List DST's part files and read their footers: schema metadata, row counts, label statistics."""

    from pipelines.schema import read_file_metadata

    names = [n for n in store.listdir("") if n.startswith("part-") and n.endswith(".parquet")]
    if not names:
        raise FileNotFoundError(f"no token files (part-*.parquet) in {store.url}; run `flextok tokenize` first")
    metadata: dict[str, Any] | None = None
    num_rows, label_range, has_captions = 0, None, False
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
            if "label" in names_in_file:
                label_range = _label_range(pf, names_in_file.index("label"), label_range)
            if "caption" in names_in_file and not has_captions:
                has_captions = _has_values(pf, names_in_file.index("caption"))
    assert metadata is not None, "no files"
    for key in ("codebook_size", "max_tokens"):
        if key not in metadata:
            raise ValueError(f"{store.url} carries no flextok metadata ({key}); tokens must come from `flextok tokenize`")
    low, high = label_range if label_range is not None else (None, None)
    return TokenData([store.path(n) for n in names], num_rows, metadata, high, has_captions, low)


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


def token_dataset(store, data: TokenData, cond: str, order_seed: int | None = None, *, chosen_prefix: bool = False):
    """Ray Dataset of (tokens, label | caption) rows read straight from DST's Parquet files.

    With `order_seed` the files are read in a seeded order that changes at every epoch (execution);
    without it, in listing order (held-out data). `chosen_prefix` cuts the rows of an
    `--adaptive-keep-all` run to the prefix length chosen for each (an EOS generator learns to stop there).
    """
    import pyarrow.fs
    import ray.data

    column = "label" if cond == "class" else "caption"
    filesystem = None if store.is_local else pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))
    shuffle = None if order_seed is None else ray.data.FileShuffleConfig(seed=order_seed, reseed_after_execution=True)
    columns = ["tokens", column] + (["chosen_num_tokens"] if chosen_prefix else [])
    ds = ray.data.read_parquet(data.paths, filesystem=filesystem, shuffle=shuffle).select_columns(columns)
    if chosen_prefix:
        ds = ds.map_batches(chosen_prefixes, batch_format="pyarrow")
    return ds.map_batches(conditioned_rows, batch_format="pyarrow", fn_kwargs={"column": column})


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


def training_rows(batch):
    """Decoded rows -> the pixels of the good ones (errors and shard end markers dropped)."""
    ok = batch.filter(pc.and_(pc.is_null(batch["error"]), pc.greater_equal(batch["index"], 0)))
    # Samples with an error; a failed shard's end marker is not a sample (read_shard logged it).
    bad = batch.filter(pc.and_(pc.is_valid(batch["error"]), pc.greater_equal(batch["index"], 0)))
    if bad.num_rows:
        line = _SKIPS.add(bad["key"].to_pylist(), bad["error"].to_pylist(), time.monotonic())
        if line is not None:
            log.warning("%s", line)
    return ok.select(["pixels"])


def image_dataset(plan, storage_options: dict, image_size: int, order_seed: int | None = None):
    """Ray Dataset of decoded training images: the pipeline's read and decode stages, reused.

    With `order_seed` the shards are read in a seeded order that changes at every epoch (execution);
    without it, in the plan's order (held-out data).
    """
    import ray.data

    from pipelines.decode import decode_batch
    from pipelines.sources import read_shard_batch

    items = [{"shard": shard.to_json(), "skip": None} for shard in plan.shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block per shard
    if order_seed is not None:  # shuffles the tiny shard descriptors only, before anything is read
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=order_seed, reseed_after_execution=True))
    ds = ds.map_batches(read_shard_batch, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"storage_options": storage_options})
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", fn_kwargs={"image_size": image_size})
    return ds.map_batches(training_rows, batch_format="pyarrow")
