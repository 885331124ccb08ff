"""Transient storage faults are retried, never recorded as data: a real TCP proxy on 127.0.0.1 between
the readers/writers and moto's S3 server resets, cuts and stalls connections (tests/pipelines/fault_proxy.py).

- A flaky object (its first GETs cut mid-transfer, more than s3fs's own 5 tries absorb): the shard reads
  exactly as without faults, the retries are counted, no error row.
- A persistent outage of one shard: the reader leaves a failure marker, not an error row and not an
  end marker; the pipeline exits non-zero naming it, writes no done marker; a re-run finishes it.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import pyarrow as pa
import pytest
from fault_proxy import FaultProxy, FaultRule
from pipeline_helpers import build_fashion_corpus, read_all, read_output

from pipelines.retry import RetryPolicy
from pipelines.sources import resolve_inputs
from pipelines.tokenize import IncompleteRunError, TokenizeConfig, run_tokenize

pytestmark = pytest.mark.slow  # moto server + proxy: integration tests, seconds each
FAST = RetryPolicy(attempts=4, base_delay_s=0.02, max_delay_s=0.05)
S3FS_TRIES = 5  # s3fs retries a cut body read 5 times itself; a fault must outlast them to reach us


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_fashion_corpus(tmp_path_factory.mktemp("flaky_corpus"), num=160, per_shard=40)


@pytest.fixture(scope="module")
def bucket(s3_server, corpus):
    name = s3_server.make_bucket("flaky")
    fs = s3_server.filesystem()
    for path in sorted(corpus.root.glob("*.tar")):
        fs.put_file(str(path), f"{name}/in/{path.name}")
    return name


@pytest.fixture
def proxy(s3_server):
    parts = urlsplit(s3_server.endpoint_url)
    p = FaultProxy((parts.hostname, parts.port))
    yield p
    p.close()


def through(s3_server, proxy, **extra) -> dict:
    """Storage options that reach the S3 server through the proxy."""
    return {**s3_server.storage_options, "endpoint_url": proxy.endpoint_url, "skip_instance_cache": True, **extra}


def shards_of(bucket: str, opts: dict):
    return resolve_inputs(f"s3://{bucket}/in/", opts).shards


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "retries"} for r in rows]


def test_a_flaky_object_reads_as_without_faults_and_counts_its_retries(s3_server, bucket, proxy):
    clean = read_all(shards_of(bucket, s3_server.storage_options)[1], storage_options=s3_server.storage_options)
    opts = through(s3_server, proxy)
    shard = shards_of(bucket, opts)[1]
    # Its first 6 GETs are cut 2 kB into the body: s3fs gives up after 5, our layer retries once.
    proxy.set_rules([FaultRule(rf"GET /{bucket}/in/{re.escape(shard.url.rsplit('/', 1)[1])}", times=S3FS_TRIES + 1)])
    rows = pa.concat_tables(list(_read(shard, opts))).to_pylist()
    assert proxy.counts["cut"] == S3FS_TRIES + 1
    assert strip(rows) == strip(clean)  # same samples, same bytes, same end marker
    assert all(r["error"] is None for r in rows)
    assert rows[-1]["index"] == -1 and rows[-1]["retries"] == 1


def test_a_fault_mid_shard_resumes_after_the_last_sample_emitted(s3_server, bucket, proxy):
    """Small read blocks: the tar streams over many GETs; faulting later ones leaves samples already
    emitted, which the retry must neither lose nor repeat."""
    small = {"default_block_size": 4096}
    clean = read_all(shards_of(bucket, s3_server.storage_options)[2], storage_options={**s3_server.storage_options, **small})
    opts = through(s3_server, proxy, **small)
    shard = shards_of(bucket, opts)[2]
    name = re.escape(shard.url.rsplit("/", 1)[1])
    proxy.set_rules([FaultRule(rf"GET /{bucket}/in/{name}", times=3, mode="pass"),  # let 3 blocks through
                     FaultRule(rf"GET /{bucket}/in/{name}", times=2 * S3FS_TRIES, mode="cut")])
    rows = pa.concat_tables(list(_read(shard, opts))).to_pylist()
    assert proxy.counts["cut"] == 2 * S3FS_TRIES
    indices = [r["index"] for r in rows[:-1]]
    assert indices == list(range(len(clean) - 1))  # every sample once, in order
    assert strip(rows) == strip(clean)
    assert rows[-1]["retries"] == 2


def test_a_persistent_outage_leaves_the_shard_unfinished_not_in_error(s3_server, bucket, proxy):
    small = {"default_block_size": 4096}
    opts = through(s3_server, proxy, **small)
    shard = shards_of(bucket, opts)[3]
    name = re.escape(shard.url.rsplit("/", 1)[1])
    proxy.set_rules([FaultRule(rf"GET /{bucket}/in/{name}", times=4, mode="pass"),
                     FaultRule(rf"GET /{bucket}/in/{name}", times=None, mode="cut")])
    rows = pa.concat_tables(list(_read(shard, opts))).to_pylist()
    samples, end = rows[:-1], rows[-1]
    assert samples and all(r["error"] is None for r in samples)  # what was read before the outage is kept
    assert [r["index"] for r in samples] == list(range(len(samples)))
    assert end["index"] == -1 and end["total"] == -1  # a failure marker: no total, so never "done"
    assert end["error"].startswith(f"storage unavailable after {FAST.attempts} attempts")
    assert end["retries"] == FAST.attempts - 1

    proxy.set_rules([])  # the outage ends: a re-run reads the rest, skipping what is staged
    rest = pa.concat_tables(list(_read(shard, opts, skip=[r["index"] for r in samples]))).to_pylist()
    clean = read_all(shards_of(bucket, s3_server.storage_options)[3], storage_options=s3_server.storage_options)
    assert strip(samples + rest) == strip(clean)


def _read(shard, opts, skip=()):
    from pipelines.sources import read_shard

    return read_shard(shard, opts, skip=skip, rows_per_batch=8, retry_policy=FAST)


# Through the whole pipeline --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(s3_server, bucket, ray_local, tiny_checkpoint):
    """A fault-free run: what every faulted run must equal."""
    dst = f"s3://{bucket}/reference"
    run_tokenize(TokenizeConfig(input=f"s3://{bucket}/in/", output=dst, model=str(tiny_checkpoint), batch_size=16,
                                storage_options=s3_server.storage_options))
    return read_output(f"{bucket}/reference", filesystem=s3_server.filesystem())


def config(s3_server, proxy, bucket, tiny_checkpoint, out: str) -> TokenizeConfig:
    return TokenizeConfig(input=f"s3://{bucket}/in/", output=f"s3://{bucket}/{out}", model=str(tiny_checkpoint),
                          batch_size=16, storage_options=through(s3_server, proxy), io_attempts=4,
                          io_retry_delay_s=0.05)


def assert_equal_tables(a: pa.Table, b: pa.Table) -> None:
    assert a.column("key").to_pylist() == b.column("key").to_pylist()
    assert a.column("tokens").to_pylist() == b.column("tokens").to_pylist()


@pytest.mark.slow
def test_pipeline_through_resets_and_cuts_equals_a_fault_free_run(s3_server, bucket, proxy, reference,
                                                                  tiny_checkpoint, ray_local):
    # Every 5th request (reads, listings, writes, markers) is reset before its response (botocore
    # retries those itself); one shard's GETs are cut mid-body more often than s3fs retries.
    proxy.every_nth = 5
    proxy.set_rules([FaultRule(rf"GET /{bucket}/in/fm-000001\.tar", times=S3FS_TRIES + 1)])
    result = run_tokenize(config(s3_server, proxy, bucket, tiny_checkpoint, "flaky"))
    proxy.every_nth = None
    rows, errors = read_output(f"{bucket}/flaky", filesystem=s3_server.filesystem())
    assert_equal_tables(rows, reference[0])
    assert errors.num_rows == 0 == reference[1].num_rows  # no error row from a transient fault
    assert proxy.counts["reset"] > 0 and proxy.counts["cut"] == S3FS_TRIES + 1
    counts = result.manifest["counts"]
    assert counts["io_retries"] >= 1 and result.manifest["run"]["io_retries"] == counts["io_retries"]
    assert counts["inputs"] == counts["rows"] == 160


@pytest.mark.slow
def test_pipeline_outage_exits_incomplete_then_a_rerun_completes(s3_server, bucket, proxy, reference,
                                                                 tiny_checkpoint, ray_local):
    cfg = config(s3_server, proxy, bucket, tiny_checkpoint, "outage")
    proxy.set_rules([FaultRule(rf"GET /{bucket}/in/fm-000002\.tar", times=None, mode="cut")])
    with pytest.raises(IncompleteRunError, match=r"1 shards unfinished: fm-000002 .*storage unavailable"):
        run_tokenize(cfg)
    fs = s3_server.filesystem()
    done = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/outage/_state/done"))
    assert done == ["fm-000000.json", "fm-000001.json", "fm-000003.json"]
    assert not fs.exists(f"{bucket}/outage/_manifest.json")  # nothing claims to be complete
    assert not fs.exists(f"{bucket}/outage/_errors")  # the outage is no data error

    proxy.set_rules([])
    result = run_tokenize(cfg)
    rows, errors = read_output(f"{bucket}/outage", filesystem=fs)
    assert_equal_tables(rows, reference[0])  # every key once: nothing lost, nothing duplicated
    assert errors.num_rows == 0
    manifest = json.loads(fs.cat_file(f"{bucket}/outage/_manifest.json"))
    assert manifest["counts"]["inputs"] == 160 and result.manifest["run"]["shards_processed"] == 1


def test_training_does_not_go_on_without_a_shard_storage_lost(s3_server, bucket, proxy):
    """The training jobs read shards with the same reader: a shard left unfinished by an outage fails
    the worker (Ray Train restarts it from the last checkpoint) instead of training on fewer rows."""
    from pipelines.decode import decode_batch
    from training.data import training_rows

    opts = through(s3_server, proxy, default_block_size=4096)
    shard = shards_of(bucket, opts)[0]
    name = re.escape(shard.url.rsplit("/", 1)[1])
    proxy.set_rules([FaultRule(rf"GET /{bucket}/in/{name}", times=4, mode="pass"),
                     FaultRule(rf"GET /{bucket}/in/{name}", times=None, mode="cut")])
    import pyarrow.compute as pc

    rows = pa.concat_tables([decode_batch(t, image_size=32) for t in _read(shard, opts)])
    samples = rows.filter(pc.greater_equal(rows["index"], 0))
    assert training_rows(samples).num_rows == samples.num_rows > 0  # what came before the outage is data
    with pytest.raises(ConnectionError, match=rf"shard {shard.id}: storage unavailable after {FAST.attempts}"):
        training_rows(rows)
