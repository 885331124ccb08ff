"""Training ingestion on its own: rows/s of the old Ray Data stream vs the exact-resume row stream.

Both read the same files in one process, one worker's view, no model:
  - ray-data: what the training jobs did before exact resume: `read_parquet` with a re-seeded file
              shuffle (tokens) or a block-order shuffle of the shard list through the pipeline's read and
              decode stages (images), one `streaming_split` shard, `iter_torch_batches` with a
              1,024-row local shuffle buffer and the Arrow collate;
  - stream:   `training.data.RowStream` + `batch_stream`: seeded unit order, reader threads, shuffle
              windows of `--window` rows, the same collate in a prefetch thread.
Sides alternate (ABBA) over `--rounds` full epochs each, so the load of a shared machine hits both alike.

    python -m benchmarks.bench_data_stream                    # 64 Ki token rows (256 tokens) + 2,048 images
    python -m benchmarks.bench_data_stream --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.bench_train import cpu_name


def write_tokens(folder: Path, files: int, rows: int, length: int) -> None:
    """Class-sorted token files (one label per file) of random ids, as `flextok tokenize` writes them."""
    from pipelines.schema import TOKEN_SCHEMA, file_metadata

    md = file_metadata(checkpoint_id="preset:bench", checkpoint_sha256=None, codebook_size=64000,
                       fsq_levels=(8, 8, 8, 5, 5, 5), max_tokens=length, image_size=256, class_names=())
    rng = np.random.default_rng(0)
    for f in range(files):
        ids = rng.integers(0, 64000, (rows, length), dtype=np.uint16)
        table = pa.Table.from_pydict({
            "key": [f"{f}-{i}" for i in range(rows)],
            "tokens": pa.ListArray.from_arrays(np.arange(0, rows * length + 1, length, dtype=np.int32), ids.ravel()),
            "num_tokens": pa.array([length] * rows, pa.uint16()), "label": pa.array([f] * rows, pa.int32()),
            "caption": [None] * rows, "source": ["bench"] * rows, "width": pa.array([256] * rows, pa.int32()),
            "height": pa.array([256] * rows, pa.int32()),
        }, schema=TOKEN_SCHEMA)
        pq.write_table(table.replace_schema_metadata(md), folder / f"part-{f:05d}.parquet", compression="zstd")


def ray_data_batches(ds, collate, batch_size: int):
    """The old training stream: one streaming_split shard, re-iterated every epoch with a local shuffle."""
    (shard,) = ds.streaming_split(1, equal=True)
    epoch = 0
    while True:
        yield from shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=True,
                                            local_shuffle_buffer_size=1024, local_shuffle_seed=epoch,
                                            prefetch_batches=2)
        epoch += 1


def stream_batches(source, collate, batch_size: int, window: int):
    from training.data import RowStream, batch_stream

    stream = RowStream(source, seed=0, rank=0, world_size=1, window_rows=window)
    return (batch for batch, _ in batch_stream(stream, collate, batch_size))


def measure(sides: dict, rows_per_epoch: int, batch_size: int, rounds: int) -> dict[str, float]:
    """rows/s of each side over `rounds` epochs, sides alternating ABBA, after one untimed batch each."""
    for it in sides.values():
        next(it)
    steps = rows_per_epoch // batch_size
    seconds = dict.fromkeys(sides, 0.0)
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(steps):
                next(sides[name])
            seconds[name] += time.perf_counter() - start
    return {name: rounds * steps * batch_size / s for name, s in seconds.items()}


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import ray.data

    from pipelines.cluster import ensure_ray
    from pipelines.corpus import build_corpus
    from pipelines.decode import decode_batch
    from pipelines.sources import read_shard_batch, resolve_inputs
    from pipelines.writer import OutputStore
    from training.data import (
        PixelCollate,
        TokenCollate,
        conditioned_rows,
        image_source,
        inspect_tokens,
        token_source,
        training_rows,
    )

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        started = ensure_ray()
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            tokens = Path(tmp) / "tokens"
            tokens.mkdir()
            write_tokens(tokens, args.token_files, args.token_rows // args.token_files, args.length)
            data = inspect_tokens(OutputStore(str(tokens)))
            shuffle = ray.data.FileShuffleConfig(seed=0, reseed_after_execution=True)
            old = ray.data.read_parquet(data.paths, shuffle=shuffle).select_columns(["tokens", "label"])
            old = old.map_batches(conditioned_rows, batch_format="pyarrow", fn_kwargs={"column": "label"})
            collate = TokenCollate(labels=True)
            results["tokens"] = measure({
                "ray-data": ray_data_batches(old, collate, args.batch_size),
                "stream": stream_batches(token_source(str(tokens), {}, data, "class", args.window), collate,
                                         args.batch_size, args.window),
            }, data.num_rows, args.batch_size, args.rounds)

            corpus = Path(tmp) / "corpus"
            build_corpus("fashion-mnist", corpus, limit=args.images, samples_per_shard=256)
            plan = resolve_inputs(str(corpus))
            items = [{"shard": shard.to_json(), "skip": None} for shard in plan.shards]
            old = ray.data.from_items(items, override_num_blocks=len(items)).randomize_block_order(
                seed=ray.data.RandomSeedConfig(seed=0, reseed_after_execution=True))
            old = old.map_batches(read_shard_batch, batch_size=1, batch_format="pyarrow")
            old = old.map_batches(decode_batch, batch_format="pyarrow", fn_kwargs={"image_size": 32})
            old = old.map_batches(training_rows, batch_format="pyarrow")
            collate = PixelCollate(32)
            results["images"] = measure({
                "ray-data": ray_data_batches(old, collate, args.batch_size),
                "stream": stream_batches(image_source(plan, {}, 32), collate, args.batch_size, args.window),
            }, args.images, args.batch_size, args.rounds)
        finally:
            if started:
                ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token-rows", type=int, default=65536)
    parser.add_argument("--token-files", type=int, default=64)
    parser.add_argument("--length", type=int, default=256, help="tokens per row (default %(default)s)")
    parser.add_argument("--images", type=int, default=2048, help="Fashion-MNIST images at 32 px (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--window", type=int, default=1024, help="stream: shuffle window rows (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="epochs per side (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("--markdown", default=None, help="append the result section to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    results = run(args)
    lines = [f"{kind}: ray-data {r['ray-data']:,.0f} rows/s, stream {r['stream']:,.0f} rows/s "
             f"({r['stream'] / r['ray-data']:.2f}x)" for kind, r in results.items()]
    print("\n".join(lines))
    if args.markdown:
        command = "python -m benchmarks.bench_data_stream " + " ".join(argv if argv is not None else sys.argv[1:])
        section = [
            "", f"- Command: `{command.strip()}`",
            f"- Machine: {cpu_name()}, {os.cpu_count()} cores, 1-min load average {load:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (other jobs share the cores). Date: {datetime.date.today()}",
            f"- {args.token_rows:,} token rows of {args.length} tokens in {args.token_files} class-sorted files; "
            f"{args.images:,} Fashion-MNIST images (32 px) in WebDataset shards of 256; batch {args.batch_size}, "
            f"{args.rounds} epochs per side, ABBA", "",
            "| data | old Ray Data stream (rows/s) | row stream (rows/s) | ratio |", "|---|---|---|---|",
            *[f"| {kind} | {r['ray-data']:,.0f} | {r['stream']:,.0f} | {r['stream'] / r['ray-data']:.2f}x |"
              for kind, r in results.items()],
        ]
        with open(args.markdown, "a") as f:
            f.write("\n".join(section) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
