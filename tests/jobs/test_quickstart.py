"""`flextok quickstart` end to end on a small slice of the emoji corpus (every stage is a real job)."""

import json

import pytest

from flextok.checkpoint import file_sha256
from jobs.quickstart import ASSETS, main


@pytest.mark.slow
def test_quickstart_writes_a_report_with_its_pictures(tmp_path, capfd):
    out = tmp_path / "qs"
    code = main(["--out", str(out), "--limit", "64", "--finetune-steps", "3", "--quiet"])
    assert code == 0
    # The local Ray serves the State API (dashboard): Ray Train's placement-group cleaner finds its
    # controller instead of warning every second that it cannot (pipelines.cluster).
    printed = "".join(capfd.readouterr())
    assert "Failed to query Ray Train Controller" not in printed and "Traceback" not in printed
    report = (out / "report.md").read_text()
    # the shipped generator, fine-tuned with Ray Train on the quickstart's own tokens
    assert "fine-tuned here for 3 steps" in report
    job = json.loads((out / "generator" / "job.json").read_text())
    assert job["model"]["init_sha256"] == file_sha256(ASSETS / "generator.safetensors")
    assert json.loads((out / "generator" / "train_summary.json").read_text())["step"] == 3
    for picture in ("samples.png", "eval/reconstructions.png", "eval/psnr_vs_k.png"):
        assert (out / picture).stat().st_size > 1000, picture
        assert picture in report
    assert "| PSNR (dB) |" in report
    assert list((out / "tokens").glob("part-*.parquet"))


def test_quickstart_refuses_a_missing_tokenizer(tmp_path, capsys):
    code = main(["--out", str(tmp_path / "qs"), "--limit", "8", "--tokenizer", str(tmp_path / "nope.safetensors"), "--quiet"])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("flextok quickstart: error:")
