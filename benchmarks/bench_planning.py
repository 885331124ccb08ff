"""Driver planning time for N input shards on a local S3 server (moto on 127.0.0.1).

Measures `resolve_inputs` of a brace pattern `shard-{000000..N-1}.tar` two ways: name by name (an
exists + info request per shard: how planning worked before) and by listing the shards' folder (what
it does now), plus the resume scan of an output folder with nothing in it for the same shards (two
listings instead of three requests per shard). Objects are tiny: the time is round trips.

    python -m benchmarks.bench_planning --shards 10000
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=10_000)
    args = p.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    import pipelines.sources as sources
    from pipelines import writer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "bench", "secret": "bench", "endpoint_url": f"http://{host}:{port}",
            "client_kwargs": {"region_name": "us-east-1"}, "use_listings_cache": False}
    client = boto3.client("s3", endpoint_url=opts["endpoint_url"], aws_access_key_id="bench",
                          aws_secret_access_key="bench", region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    width = max(6, len(str(args.shards - 1)))
    names = [f"in/shard-{i:0{width}d}.tar" for i in range(args.shards)]
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: client.put_object(Bucket="bench", Key=n, Body=b"x" * 1024), names))
    print(f"uploaded {args.shards} objects in {time.perf_counter() - t:.1f} s")
    url = f"s3://bench/in/shard-{{{0:0{width}d}..{args.shards - 1:0{width}d}}}.tar"

    t = time.perf_counter()
    listed = sources.resolve_inputs(url, opts)
    t_listed = time.perf_counter() - t
    saved = sources.LISTABLE_PROTOCOLS
    sources.LISTABLE_PROTOCOLS = ()
    t = time.perf_counter()
    one_by_one = sources.resolve_inputs(url, opts)
    t_one_by_one = time.perf_counter() - t
    sources.LISTABLE_PROTOCOLS = saved
    assert listed.shards == one_by_one.shards and len(listed.shards) == args.shards

    store = writer.OutputStore("s3://bench/out", opts)
    t = time.perf_counter()
    leftovers = set(store.listdir("")) | set(store.listdir(writer.ERRORS_DIR))
    staged = writer.staged_shard_ids(store)
    t_scan = time.perf_counter() - t
    sample = listed.shards[: min(500, args.shards)]  # per-shard requests, timed on a sample
    t = time.perf_counter()
    for shard in sample:
        store.rm(writer.part_name(shard.id))
        store.rm(f"{writer.ERRORS_DIR}/{writer.part_name(shard.id)}")
        writer.staged_indices(store, shard.id)
    t_per_shard = (time.perf_counter() - t) / len(sample) * args.shards
    assert not leftovers and not staged
    server.stop()
    print(f"resolve_inputs, {args.shards} shards: name by name {t_one_by_one:.1f} s, by folder listing "
          f"{t_listed:.2f} s ({t_one_by_one / t_listed:.0f}x)")
    print(f"resume scan of the output: 3 requests per shard ~{t_per_shard:.1f} s (from {len(sample)} shards), "
          f"two listings {t_scan:.2f} s")


if __name__ == "__main__":
    main()
