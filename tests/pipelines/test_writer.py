import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import writer
from pipelines.schema import ENCODED_SCHEMA, TOKEN_SCHEMA, file_metadata, read_file_metadata
from pipelines.sources import Shard
from pipelines.writer import IncompleteShardError, OutputStore

META = file_metadata(checkpoint_id="preset:tiny", checkpoint_sha256=None, codebook_size=1000,
                     fsq_levels=(8, 5, 5, 5), max_tokens=3, image_size=32)


def _encoded(shard: str, indices: list[int], total: int | None = None, bad: tuple[int, ...] = ()) -> pa.Table:
    rows = []
    for i in indices:
        rows.append({
            "shard": shard, "index": i, "total": -1, "key": f"{shard}/{i}", "source": f"file:///{shard}.tar",
            "label": i % 3, "caption": None, "width": 50, "height": 40,
            "error": "corrupt image: x" if i in bad else None, "stage": "decode" if i in bad else None,
            "tokens": None if i in bad else [i, i + 1, i + 2],
        })
    if total is not None:
        rows.append({"shard": shard, "index": -1, "total": total, "key": "", "source": f"file:///{shard}.tar"})
    return pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA)


def _shard(sid: str) -> Shard:
    return Shard(id=sid, url=f"file:///{sid}.tar", format="webdataset", fingerprint="f")


def test_pieces_are_idempotent_and_reported(tmp_path):
    store = OutputStore(str(tmp_path))
    batch = pa.concat_tables([_encoded("a", [3, 1, 2], bad=(2,)), _encoded("b", [0], total=1)])
    records = writer.write_pieces(batch, store).to_pylist()
    assert [(r["shard"], sorted(r["indices"]), r["total"], r["num_rows"], r["num_errors"]) for r in records] == [
        ("a", [1, 2, 3], -1, 2, 1), ("b", [0], 1, 1, 0)]
    names = store.listdir(f"{writer.STAGING_DIR}/a")
    writer.write_pieces(batch, store)  # a retried task rewrites the same piece
    assert store.listdir(f"{writer.STAGING_DIR}/a") == names and len(names) == 1
    assert writer.staged_indices(store, "a") == {1, 2, 3}
    assert not any(n.startswith(".") for n in os.listdir(tmp_path / writer.STAGING_DIR / "a"))


def test_finalize_merges_sorted_deduplicated_rows_then_marks(tmp_path):
    store = OutputStore(str(tmp_path))
    writer.write_pieces(_encoded("s", [2, 0]), store)
    writer.write_pieces(_encoded("s", [1, 2, 3], bad=(3,)), store)  # index 2 again (a retry)
    with pytest.raises(IncompleteShardError):
        writer.finalize_shard(store, _shard("s"), 5, META)
    assert not store.exists(f"{writer.DONE_DIR}/s.json")
    marker = writer.finalize_shard(store, _shard("s"), 4, META)
    assert (marker["inputs"], marker["rows"], marker["errors"]) == (4, 3, 1)
    assert marker["errors_by_kind"] == {"corrupt image": 1} and marker["token_length_histogram"] == {"3": 3}
    rows = pq.read_table(tmp_path / "part-s.parquet")
    assert rows.schema.equals(TOKEN_SCHEMA) and rows.column("key").to_pylist() == ["s/0", "s/1", "s/2"]
    assert read_file_metadata(rows.schema)["max_tokens"] == 3
    errors = pq.read_table(tmp_path / "_errors" / "part-s.parquet")
    assert errors.column("key").to_pylist() == ["s/3"]
    assert writer.load_markers(store)["s"]["rows"] == 3
    assert not store.exists(f"{writer.STAGING_DIR}/s")


def test_finalize_is_deterministic_whatever_the_piece_layout(tmp_path):
    a, b = OutputStore(str(tmp_path / "a")), OutputStore(str(tmp_path / "b"))
    writer.write_pieces(_encoded("s", [0, 1, 2, 3, 4]), a)
    for part in ([4], [0, 2], [1, 3], [2]):
        writer.write_pieces(_encoded("s", part), b)
    writer.finalize_shard(a, _shard("s"), 5, META)
    writer.finalize_shard(b, _shard("s"), 5, META)
    assert (tmp_path / "a" / "part-s.parquet").read_bytes() == (tmp_path / "b" / "part-s.parquet").read_bytes()


def test_empty_shard_finalizes_without_files(tmp_path):
    store = OutputStore(str(tmp_path))
    marker = writer.finalize_shard(store, _shard("e"), 0, META)
    assert marker["files"] == [] and marker["inputs"] == 0
    assert not (tmp_path / "part-e.parquet").exists()


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    store = OutputStore(str(tmp_path))
    store.write_json("x/y.json", {"a": 1})
    store.write_bytes("x/y.json", b"{}")
    assert os.listdir(tmp_path / "x") == ["y.json"]
    assert store.read_json("x/y.json") == {}
    assert store.listdir("missing") == []


def test_aggregate_sums_markers():
    m1 = {"inputs": 3, "rows": 2, "errors": 1, "errors_by_kind": {"empty image": 1},
          "errors_by_stage": {"decode": 1}, "token_length_histogram": {"32": 2}}
    m2 = {"inputs": 2, "rows": 2, "errors": 0, "errors_by_kind": {}, "errors_by_stage": {},
          "token_length_histogram": {"32": 1, "8": 1}, "retries": 3}
    out = writer.aggregate([m1, m2])
    assert out["counts"] == {"inputs": 5, "rows": 4, "errors": 1, "errors_by_kind": {"empty image": 1},
                             "errors_by_stage": {"decode": 1}, "io_retries": 3}
    assert out["token_length_histogram"] == {"8": 1, "32": 3}


def test_piece_parquet_reads_back(tmp_path):
    store = OutputStore(str(tmp_path))
    writer.write_pieces(_encoded("s", [0, 1]), store)
    name = store.listdir(f"{writer.STAGING_DIR}/s")[0]
    table = pq.read_table(io.BytesIO(store.read_bytes(f"{writer.STAGING_DIR}/s/{name}")))
    assert table.column("index").to_pylist() == [0, 1]


def test_corrupt_staged_piece_is_removed_and_its_rows_redone(tmp_path):
    store = OutputStore(str(tmp_path))
    writer.write_pieces(_encoded("s", [0, 1]), store)
    writer.write_pieces(_encoded("s", [2, 3]), store)
    torn = sorted((tmp_path / writer.STAGING_DIR / "s").glob("*.parquet"))[1]
    torn.write_bytes(torn.read_bytes()[:40])  # a piece cut short (a killed write on a store without renames)
    assert writer.staged_indices(store, "s") == {0, 1}  # 2 and 3 are not done: they will be redone
    assert not torn.exists()
    writer.write_pieces(_encoded("s", [2, 3]), store)
    assert writer.finalize_shard(store, _shard("s"), 4, META)["rows"] == 4


def test_corrupt_marker_means_the_shard_is_redone(tmp_path):
    store = OutputStore(str(tmp_path))
    writer.write_pieces(_encoded("s", [0], total=1), store)
    writer.finalize_shard(store, _shard("s"), 1, META)
    (tmp_path / writer.DONE_DIR / "s.json").write_text('{"shard": "s", "inp')
    assert writer.load_markers(store) == {"s": {"shard": "s", "fingerprint": None}}  # matches no input
