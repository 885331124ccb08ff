"""`flextok corpus`: demo WebDataset corpora from the OS-installed data."""

from __future__ import annotations

import json
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
