"""`flextok corpus`: demo WebDataset corpora from the OS-installed data."""

from __future__ import annotations

import json
import signal
import tarfile

import pytest

from jobs import corpus as job


def test_fashion_mnist_test_split(tmp_path, capsys):
    out = tmp_path / "fm"
    assert job.main(["fashion-mnist", "--out", str(out), "--split", "test", "--limit", "5",
                     "--samples-per-shard", "2"]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["num_samples"] == 5 and info["split"] == "test" and info["image_size"] == 28
    assert sorted(p.name for p in out.glob("*.tar")) == [f"fashion-mnist-test-00000{i}.tar" for i in range(3)]
    assert "5 samples" in capsys.readouterr().out


def test_emoji_with_size(tmp_path):
    out = tmp_path / "emoji"
    assert job.main(["emoji", "--out", str(out), "--size", "16", "--limit", "3", "--quiet"]) == 0
    with tarfile.open(next(out.glob("*.tar"))) as tar:
        names = tar.getnames()
        caption = tar.extractfile(names[2]).read().decode()
    assert names[0].endswith(".png") and caption == "grinning face"


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        job.main(["mnist", "--out", str(tmp_path)])
    assert exc.value.code == 2
    (tmp_path / "file").write_text("x")
    assert job.main(["emoji", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"flextok corpus: error: --out {tmp_path / 'file'} exists and is not a folder"


@pytest.mark.parametrize("size", ["100000", "0", "1025"])
def test_absurd_size_is_refused_at_once(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exc:  # was: a hang that ignored Ctrl-C (10^10 pixels per image)
        job.main(["emoji", "--out", str(tmp_path / "c"), "--size", size])
    assert exc.value.code == 2
    assert f"--size: expected an integer in 1..1024, got {int(size)}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _tree(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_ctrl_c_leaves_the_corpus_that_was_there_and_a_rerun_rebuilds(tmp_path, subprocess_env):
    """A real SIGINT to a long `flextok corpus` (60,000 images) once it has written a shard: it stops at
    once with one line, leaves no shard, no temporary file and no dataset.json of its own (the corpus
    already in --out stays byte for byte), and a re-run writes the whole corpus, with no stale shard."""
    import subprocess
    import sys
    import time

    from pipelines.corpus import build_corpus

    out = tmp_path / "fm"
    build_corpus("fashion-mnist", out, limit=3000, samples_per_shard=1000)  # an earlier corpus: 3 shards
    before = _tree(out)
    argv = [sys.executable, "-m", "jobs.corpus", "fashion-mnist", "--out", str(out), "--size", "64",
            "--samples-per-shard", "600"]
    proc = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob(".fashion-mnist-train-000001.tar.tmp-*")):  # shard 0 written, shard 1 begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130 and err.strip().splitlines() == ["flextok corpus: interrupted"], err
    assert took < 10, took
    assert _tree(out) == before  # hidden temporaries included: none is left

    rerun = argv[:-2] + ["--samples-per-shard", "600", "--limit", "1200", "--quiet"]  # kept short here
    assert subprocess.run(rerun, env=subprocess_env(), capture_output=True).returncode == 0
    fresh = tmp_path / "fresh"
    build_corpus("fashion-mnist", fresh, size=64, limit=1200, samples_per_shard=600)
    assert _tree(out) == _tree(fresh)  # two shards: the earlier corpus's third is gone
    assert json.loads((out / "dataset.json").read_text())["shards"] == [
        "fashion-mnist-train-000000.tar", "fashion-mnist-train-000001.tar"]


def test_temporaries_of_a_killed_writer_are_removed_and_a_live_ones_kept(tmp_path):
    import os
    import subprocess

    from pipelines.corpus import build_corpus

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "c"
    out.mkdir()
    (out / f".emoji-all-000000.tar.tmp-{dead.pid}").write_bytes(b"half a tar")
    (out / f".dataset.json.tmp-{dead.pid}").write_bytes(b"{")
    (out / f".emoji-all-000000.tar.tmp-{os.getppid()}").write_bytes(b"another writer's")
    build_corpus("emoji", out, size=16, limit=2)
    assert sorted(p.name for p in out.iterdir()) == [
        f".emoji-all-000000.tar.tmp-{os.getppid()}", "dataset.json", "emoji-all-000000.tar"]
