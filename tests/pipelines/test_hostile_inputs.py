"""Careless and hostile inputs at the read stage: each is its own error rows or a counted skip, never
the job's end and never a silent drop (red-team findings 2, 3, 4, 7, 10 of issue 22)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import jpeg_bytes, read_all, write_tar

from pipelines import sources
from pipelines.sources import resolve_inputs
from pipelines.tokenize import TokenizeConfig, run_tokenize


def _outcomes(url: str) -> dict[str, str | None]:
    """key -> error kind (None for a good sample) over every shard of `url`."""
    out = {}
    for shard in resolve_inputs(url).shards:
        rows = read_all(shard)
        assert rows[-1]["index"] == -1 and rows[-1]["total"] == len(rows) - 1  # every input counted
        out.update({r["key"]: (r["error"] or "").split(":")[0] or None for r in rows[:-1]})
    return out


def test_parquet_file_with_a_wrong_image_column_is_that_files_error_row(tmp_path, real_images):
    good = jpeg_bytes(real_images, 0)
    pq.write_table(pa.table({"image": [good, good], "label": [1, 2]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [1, 2, 3]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"image": [[1, 2], [3]]}), tmp_path / "c.parquet")
    pq.write_table(pa.table({"image": [good], "label": [-3]}), tmp_path / "d.parquet")
    out = _outcomes(str(tmp_path))
    assert out == {"a/0": None, "a/1": None, "b/*": "unreadable shard", "c/*": "unreadable shard",
                   "d/0": "bad metadata"}
    (b_row,) = read_all(resolve_inputs(str(tmp_path / "b.parquet")).shards[0])[:-1]
    assert "column 'image' holds int64, not image bytes" in b_row["error"]


def test_parquet_files_that_can_hold_no_image_are_found_from_their_footers(tmp_path, real_images):
    """What a training job skips up front: a wrong image column, no image column, a truncated file and
    a file that is not Parquet; a good file and a good struct<bytes> column are kept."""
    good = real_images[0].data
    pq.write_table(pa.table({"image": [good]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": pa.array([{"bytes": good, "path": "x"}])}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"image": [1, 2]}), tmp_path / "c.parquet")
    pq.write_table(pa.table({"pixels": [good]}), tmp_path / "d.parquet")
    whole = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "e.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "f.parquet").write_bytes(b"not parquet at all\n" * 20)
    plan = resolve_inputs(str(tmp_path))
    problems = {s.url.rsplit("/", 1)[-1]: p for s in plan.shards if (p := sources.unusable_parquet_shards(plan).get(s.id))}
    assert sorted(problems) == ["c.parquet", "d.parquet", "e.parquet", "f.parquet"]
    assert problems["c.parquet"] == "unreadable shard: column 'image' holds int64, not image bytes (binary)"
    assert problems["d.parquet"].startswith("unreadable shard: no image column")
    assert all(problems[n].startswith("unreadable shard: ArrowInvalid: ") for n in ("e.parquet", "f.parquet"))


def test_labels_outside_the_class_id_range_are_error_rows(tmp_path, real_images):
    good = jpeg_bytes(real_images, 0)
    members = []
    for key, label in (("neg", b"-1"), ("huge", b"9999999999"), ("max", str(sources.MAX_LABEL).encode()),
                       ("ok", b"7"), ("zero", b"0")):
        members += [(f"{key}.jpg", good), (f"{key}.cls", label)]
    write_tar(tmp_path / "s.tar", members)
    assert _outcomes(str(tmp_path / "s.tar")) == {
        "s/neg": "bad metadata", "s/huge": "bad metadata", "s/max": "bad metadata", "s/ok": None, "s/zero": None}


def test_tar_cut_on_a_block_boundary_is_reported_truncated(tmp_path, real_images):
    members = [(f"t{i}.jpg", jpeg_bytes(real_images, i)) for i in range(6)]
    write_tar(tmp_path / "whole.tar", members)
    data = (tmp_path / "whole.tar").read_bytes()
    offset = sum(512 + (len(p) + 511) // 512 * 512 for _, p in members[:4])  # end of the 4th member
    (tmp_path / "cut.tar").write_bytes(data[:offset])
    with tarfile.open(tmp_path / "cut.tar") as tar:
        assert tar.getnames() == [f"t{i}.jpg" for i in range(4)]  # tarfile itself sees a clean end
    assert _outcomes(str(tmp_path / "cut.tar")) == {**{f"cut/t{i}": None for i in range(4)}, "cut/*": "truncated shard"}
    assert _outcomes(str(tmp_path / "whole.tar")) == {f"whole/t{i}": None for i in range(6)}
    gz = tmp_path / "cutgz.tar.gz"
    gz.write_bytes(gzip.compress(data[:offset]))
    assert _outcomes(str(gz))["cutgz/*"] == "truncated shard"


def test_oversized_tar_member_and_parquet_cell_are_error_rows(tmp_path, real_images, monkeypatch):
    monkeypatch.setattr(sources, "MAX_SAMPLE_BYTES", 50_000)
    small, big = jpeg_bytes(real_images, 0, (40, 30)), os.urandom(60_000)
    assert len(small) < 50_000
    write_tar(tmp_path / "s.tar", [("a.jpg", small), ("b.jpg", big), ("b.cls", b"1"), ("c.jpg", small)])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in (("a.jpg", small), ("b.jpg", big)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "g.tar.gz").write_bytes(buf.getvalue())
    assert _outcomes(str(tmp_path / "s.tar")) == {"s/a": None, "s/b": "sample too large", "s/c": None}
    assert _outcomes(str(tmp_path / "g.tar.gz")) == {"g/a": None, "g/b": "sample too large"}
    pq.write_table(pa.table({"image": [small, big]}), tmp_path / "p.parquet")
    assert _outcomes(str(tmp_path / "p.parquet")) == {"p/0": None, "p/1": "sample too large"}
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes(small)
    (images / "b.jpg").write_bytes(big)
    assert _outcomes(str(images)) == {"a.jpg": None, "b.jpg": "sample too large"}


def test_image_folder_reads_underscore_names_and_file_links_and_counts_what_it_skips(tmp_path, real_images):
    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    root.mkdir(), elsewhere.mkdir()
    for name in ("_MG_0001.jpg", "IMG_0002.jpg"):
        (root / name).write_bytes(jpeg_bytes(real_images, 1))
    (elsewhere / "far.jpg").write_bytes(jpeg_bytes(real_images, 2))
    (root / "linked.jpg").symlink_to(elsewhere / "far.jpg")
    (root / "linked_folder").symlink_to(elsewhere)
    (root / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "photo.heic").write_bytes(b"not supported")
    (root / ".DS_Store").write_bytes(b"x")
    plan = resolve_inputs(str(root))
    assert list(plan.shards[0].keys) == ["IMG_0002.jpg", "_MG_0001.jpg", "linked.jpg"]
    assert dict(plan.skipped) == {"symlinked folder (not followed)": 1, "broken symlink": 1,
                                  "unsupported format (.heic)": 1, "hidden (name starts with '.')": 1}
    assert plan.describe()["skipped_files"] == dict(plan.skipped)
    assert _outcomes(str(root)) == {"IMG_0002.jpg": None, "_MG_0001.jpg": None, "linked.jpg": None}


def test_output_reached_through_a_symlink_inside_the_input_is_refused(tmp_path, real_images):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(real_images, 0))
    alias = tmp_path / "alias"
    alias.symlink_to(src)  # alias/out is src/out: the output would be read back as input
    with pytest.raises(ValueError, match="inside the input folder"):
        run_tokenize(TokenizeConfig(input=str(src), output=str(alias / "out"), model="tiny"))
    far = tmp_path / "far"
    far.mkdir()
    (far / "b.jpg").write_bytes(jpeg_bytes(real_images, 1))
    (far / "link.jpg").symlink_to(tmp_path / "dst" / "x.jpg")  # an input file that resolves into the output
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "x.jpg").write_bytes(jpeg_bytes(real_images, 2))
    with pytest.raises(ValueError, match="inside the input folder, or an input inside"):
        run_tokenize(TokenizeConfig(input=str(far), output=str(tmp_path / "dst"), model="tiny"))
