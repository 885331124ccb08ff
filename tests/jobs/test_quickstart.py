"""`flextok quickstart` end to end on a small slice of the emoji corpus (every stage is a real job)."""

import pytest

from jobs.quickstart import main


@pytest.mark.slow
def test_quickstart_writes_a_report_with_its_pictures(tmp_path):
    out = tmp_path / "qs"
    code = main(["--out", str(out), "--limit", "64", "--tokenizer-steps", "4", "--generator-steps", "4", "--quiet"])
    assert code == 0
    report = (out / "report.md").read_text()
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
