"""Re-running into a finished output after the input changed: exactly the changed shards are redone,
outputs of vanished inputs go, and nothing stale survives (DESIGN §2.2)."""

from __future__ import annotations

import json
import os

import pytest
from pipeline_helpers import jpeg_bytes, read_output, write_tar

from pipelines.sources import resolve_inputs
from pipelines.tokenize import TokenizeConfig, run_tokenize


def _shard_members(real_images, name: str, count: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [m for i in range(start, start + count) for m in ((f"{name}-{i}.jpg", jpeg_bytes(real_images, i)),
                                                          (f"{name}-{i}.cls", str(i % 3).encode()))]


def test_same_size_in_place_edit_changes_the_fingerprint(tmp_path):
    path = tmp_path / "a.tar"
    write_tar(path, [("x.jpg", b"1" * 100)])
    before = resolve_inputs(str(path)).shards[0].fingerprint
    write_tar(path, [("x.jpg", b"2" * 100)])  # same size, other content
    os.utime(path, ns=(1, 1_000_000_000 + os.stat(path).st_mtime_ns))  # as any later write would
    assert resolve_inputs(str(path)).shards[0].fingerprint != before
    assert resolve_inputs(str(path)).shards[0].fingerprint == resolve_inputs(str(path)).shards[0].fingerprint


@pytest.mark.slow
def test_appended_sample_redoes_only_its_shard_and_vanished_shards_go(ray_local, tiny_checkpoint, real_images,
                                                                      tmp_path):
    src, out = tmp_path / "in", tmp_path / "dst"
    src.mkdir()
    for n in range(3):
        write_tar(src / f"s{n}.tar", _shard_members(real_images, f"s{n}", 4))
    cfg = TokenizeConfig(input=str(src), output=str(out), model=str(tiny_checkpoint), batch_size=8)
    run_tokenize(cfg)
    untouched = {n: (out / f"part-s{n}.parquet").stat().st_mtime_ns for n in (0, 2)}

    write_tar(src / "s1.tar", _shard_members(real_images, "s1", 5))  # one more sample in s1
    result = run_tokenize(cfg)
    assert not result.nothing_to_do
    assert result.manifest["run"]["samples_processed"] == 5 and result.manifest["run"]["shards_already_done"] == 2
    assert {n: (out / f"part-s{n}.parquet").stat().st_mtime_ns for n in (0, 2)} == untouched
    rows, errors = read_output(out)
    assert rows.num_rows == 13 and errors.num_rows == 0
    assert sum(k.startswith("s1/") for k in rows.column("key").to_pylist()) == 5

    (src / "s2.tar").unlink()  # the input shrinks: s2's rows must not stay in the dataset
    result = run_tokenize(cfg)
    rows, _ = read_output(out)
    keys = rows.column("key").to_pylist()
    assert rows.num_rows == 9 == result.manifest["counts"]["rows"] and len(set(keys)) == len(keys)
    assert not any(k.startswith("s2/") for k in keys)
    assert not (out / "part-s2.parquet").exists() and not (out / "_state" / "done" / "s2.json").exists()
    assert [s["shard"] for s in json.loads((out / "_manifest.json").read_text())["shards"]] == ["s0", "s1"]
    assert run_tokenize(cfg).nothing_to_do
