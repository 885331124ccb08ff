import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pipeline_helpers import jpeg_bytes, read_all

from pipelines.corpus import FASHION_MNIST_CLASSES, build_corpus
from pipelines.sources import (
    Shard,
    effective_storage_options,
    expand_braces,
    redact_options,
    resolve_inputs,
)


def test_expand_braces_ranges_lists_and_padding():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/s-{1..2}.tar") == ["x/s-1.tar", "x/s-2.tar", "y/s-1.tar", "y/s-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="brace"):
        expand_braces("a-{oops}.tar")


@given(st.integers(0, 50), st.integers(0, 50))
def test_expand_braces_counts(lo, hi):
    names = expand_braces(f"s-{{{lo}..{hi}}}")
    assert len(names) == abs(hi - lo) + 1 and len(set(names)) == len(names)


def test_resolve_folder_of_tars_glob_and_brace(bad_corpus):
    plan = resolve_inputs(str(bad_corpus.root))
    assert plan.format == "webdataset"
    assert [s.id for s in plan.shards] == [f"shard-00000{i}" for i in range(4)]
    assert [s.id for s in resolve_inputs(str(bad_corpus.root / "shard-00000[01].tar")).shards] == [
        "shard-000000", "shard-000001"]
    braced = resolve_inputs(bad_corpus.url)
    assert [s.id for s in braced.shards] == [f"shard-00000{i}" for i in range(5)]  # the missing one too
    assert resolve_inputs("file://" + str(bad_corpus.root)).shards[0].url.startswith("file://")


def test_a_brace_pattern_is_planned_by_listing_its_folder_as_by_looking_up_each_name(bad_corpus, monkeypatch):
    import pipelines.sources as sources

    calls: list = []
    listed = sources.resolve_inputs(bad_corpus.url)
    monkeypatch.setattr(sources, "LISTABLE_PROTOCOLS", ())  # the name-by-name lookup
    looked_up = sources.resolve_inputs(bad_corpus.url)
    assert listed.shards == looked_up.shards  # ids, urls, fingerprints; the missing shard too
    assert listed.shards[4].fingerprint == looked_up.shards[4].fingerprint
    monkeypatch.setattr(sources, "LISTABLE_PROTOCOLS", ("file", "local"))
    from fsspec.implementations.local import LocalFileSystem

    for name in ("exists", "isdir", "info"):  # the listing path makes no request per name
        original = getattr(LocalFileSystem, name)
        monkeypatch.setattr(LocalFileSystem, name,
                            lambda self, path, *a, _o=original, **k: calls.append(path) or _o(self, path, *a, **k))
    assert sources.resolve_inputs(bad_corpus.url).shards == listed.shards
    assert not [c for c in calls if str(c).endswith(".tar")], calls


def test_resolve_rejects_missing_and_empty_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_inputs(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no WebDataset"):
        resolve_inputs(str(tmp_path))


def test_resolve_image_folder_with_class_subfolders(tmp_path, real_images):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.jpg").write_bytes(jpeg_bytes(real_images, i))
    (tmp_path / "loose.jpg").write_bytes(jpeg_bytes(real_images, 0))
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    plan = resolve_inputs(str(tmp_path), files_per_shard=4)
    assert plan.format == "images" and plan.class_names == ("cat", "dog")
    assert [s.id for s in plan.shards] == ["images-000000", "images-000001"]
    keys = [k for s in plan.shards for k in s.keys]
    labels = [lab for s in plan.shards for lab in s.labels]
    assert keys == ["cat/0.jpg", "cat/1.jpg", "cat/2.jpg", "dog/0.jpg", "dog/1.jpg", "dog/2.jpg", "loose.jpg"]
    assert labels == [0, 0, 0, 1, 1, 1, None]
    rows = read_all(plan.shards[1])
    assert [r["key"] for r in rows if r["index"] >= 0] == ["dog/1.jpg", "dog/2.jpg", "loose.jpg"]
    assert rows[-1]["total"] == 3


def test_shard_ids_stay_unique_when_paths_collide(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.tar").write_bytes(b"")
    ids = [s.id for s in resolve_inputs(str(tmp_path)).shards]
    assert ids == ["a-x", "b-x"]
    (tmp_path / "a-x.tar").write_bytes(b"")
    ids = [s.id for s in resolve_inputs(str(tmp_path)).shards]
    assert len(set(ids)) == 3 and all("/" not in i for i in ids)


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "s.tar").write_bytes(b"a" * 10)
    before = resolve_inputs(str(tmp_path)).shards[0]
    assert Shard.from_json(before.to_json()) == before
    (tmp_path / "s.tar").write_bytes(b"a" * 20)
    assert resolve_inputs(str(tmp_path)).shards[0].fingerprint != before.fingerprint


def test_read_stage_reports_bad_samples_and_shards(bad_corpus):
    plan = resolve_inputs(bad_corpus.url)
    rows = [r for shard in plan.shards for r in read_all(shard)]
    errors = {r["key"]: r["error"].split(":")[0] for r in rows if r["error"] and r["index"] >= 0}
    assert errors == {
        "shard-000001/noimage": "no image member", "shard-000001/badlabel": "bad metadata",
        "shard-000001/dup": "duplicate key", "shard-000002/*": "unreadable shard",
        "shard-000003/*": "unreadable shard", "shard-000004/*": "missing shard",
    }
    ends = {r["shard"]: r["total"] for r in rows if r["index"] < 0}
    samples = [r for r in rows if r["index"] >= 0]
    assert sum(ends.values()) == len(samples) == bad_corpus.num_inputs
    assert ends["shard-000003"] == 4  # three samples, then the broken rest as one row
    first = next(r for r in samples if r["key"] == "shard-000000/photo0")
    assert first["label"] == 0 and first["caption"] and first["image"][:2] == b"\xff\xd8"
    json_only = next(r for r in samples if r["key"] == "shard-000000/json_only")
    assert (json_only["label"], json_only["caption"]) == (7, "from json")


def test_read_stage_skips_done_indices_but_counts_them(bad_corpus):
    shard = resolve_inputs(bad_corpus.url).shards[1]
    all_rows = read_all(shard)
    rows = read_all(shard, skip={0, 2, 5})
    assert [r["index"] for r in rows if r["index"] >= 0] == [i for i in range(len(all_rows) - 1) if i not in {0, 2, 5}]
    assert rows[-1]["total"] == all_rows[-1]["total"]


def test_read_parquet_with_hugging_face_image_struct(tmp_path, real_images):
    images = [{"bytes": jpeg_bytes(real_images, i), "path": f"{i}.jpg"} for i in range(3)] + [None]
    table = pa.table({"image": images, "label": [1, 2, 3, 4], "text": ["a", "b", None, "d"]})
    pq.write_table(table, tmp_path / "train-00000.parquet")
    plan = resolve_inputs(str(tmp_path))
    assert plan.format == "parquet" and plan.shards[0].id == "train-00000"
    rows = read_all(plan.shards[0])
    assert [r["key"] for r in rows[:-1]] == [f"train-00000/{i}" for i in range(4)]
    assert [r["label"] for r in rows[:3]] == [1, 2, 3] and rows[1]["caption"] == "b"
    assert rows[0]["image"] == images[0]["bytes"]
    assert rows[3]["error"].startswith("empty image")
    assert rows[-1]["total"] == 4


def test_parquet_duplicate_keys_are_reported(tmp_path, real_images):
    data = jpeg_bytes(real_images, 0)
    pq.write_table(pa.table({"jpg": [data, data, data], "key": ["a", "b", "a"]}), tmp_path / "p.parquet")
    rows = read_all(resolve_inputs(str(tmp_path)).shards[0])
    assert [r["key"] for r in rows[:-1]] == ["p/a", "p/b", "p/a"]
    assert [r["error"] is None for r in rows[:-1]] == [True, True, False]
    assert rows[2]["error"].startswith("duplicate key")


def test_parquet_without_image_column_is_one_error_row(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "p.parquet")
    rows = read_all(resolve_inputs(str(tmp_path)).shards[0])
    assert rows[0]["error"].startswith("unreadable shard") and "no image column" in rows[0]["error"]
    assert rows[-1]["total"] == 1


def test_storage_options_from_aws_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    opts = effective_storage_options("s3://bucket/x", {"anon": False})
    assert opts["key"] == "AKIA123" and opts["secret"] == "very-secret"
    assert opts["endpoint_url"] == "http://127.0.0.1:9" and opts["client_kwargs"] == {"region_name": "eu-west-1"}
    assert effective_storage_options("s3://b", {"key": "mine", "secret": "s"})["key"] == "mine"
    assert effective_storage_options("/local/path", {"key": "k"}) == {}
    safe = redact_options(opts)
    assert "very-secret" not in repr(safe) and "AKIA123" not in repr(safe)
    assert safe["endpoint_url"] == "http://127.0.0.1:9"


def test_unreadable_file_in_image_folder_is_one_error_row(tmp_path, real_images):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(real_images, 0))
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(real_images, 1))
    plan = resolve_inputs(str(tmp_path))
    os.remove(tmp_path / "b.jpg")  # vanished between listing and reading
    rows = read_all(plan.shards[0])
    assert rows[0]["error"] is None and rows[1]["error"].startswith("missing file")
    assert rows[0]["image"][:2] == b"\xff\xd8"


def test_webdataset_plan_takes_class_names_from_dataset_json(tmp_path):
    build_corpus("fashion-mnist", tmp_path / "fm", limit=4, samples_per_shard=4)
    assert resolve_inputs(str(tmp_path / "fm")).class_names == FASHION_MNIST_CLASSES
    (tmp_path / "fm" / "dataset.json").write_text("not json")  # a foreign or broken file: names stay unknown
    assert resolve_inputs(str(tmp_path / "fm" / "*.tar")).class_names == ()
