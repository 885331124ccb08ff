"""`flextok quickstart` end to end on a small slice of the emoji corpus (every stage is a real job)."""

import io
import json
import os
import shlex
import sys
from pathlib import Path

import pytest
from PIL import Image

from flextok.checkpoint import file_sha256
from jobs.quickstart import ASSETS, DEFAULT_OUT, StageFailed, Stages, main


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
    # one report: Fashion-MNIST reconstructions over k and class samples beside the emoji pictures
    pictures = {"fashion-mnist/eval/reconstructions.png": 8 * 7, "fashion-mnist/classes.png": 10 * 6,
                "fashion-mnist/classes-eos.png": 10 * 6,
                "samples.png": 8 * 4, "eval/reconstructions.png": 8 * 7, "eval/psnr_vs_k.png": None}
    for picture, cells in pictures.items():
        assert f"]({picture})" in report, picture
        with Image.open(out / picture) as im:
            assert im.width > 100 and im.height > 100, picture
            if cells:  # a labelled grid of 28/32 px cells: at least this many cells' worth of pixels
                assert im.width * im.height >= cells * 28 * 28, picture
    assert report.index("Fashion-MNIST") < report.index("## Emoji")
    assert "stops each image where it chooses, here after" in report  # the shipped EOS generator
    tables = [line for line in report.splitlines() if line.startswith("| PSNR (dB) |")]
    assert len(tables) == 2  # Fashion-MNIST's and the emoji's
    fm_psnr = [float(v) for v in tables[0].strip("|").split("|")[1:]]
    assert len(fm_psnr) == 6 and fm_psnr[-1] > fm_psnr[0] > 12  # more tokens, better; the mean image gives ~11
    assert "| class kept" in report
    assert list((out / "tokens").glob("part-*.parquet"))


def test_quickstart_refuses_a_missing_tokenizer(tmp_path, capsys):
    code = main(["--out", str(tmp_path / "qs"), "--limit", "8", "--tokenizer", str(tmp_path / "nope.safetensors"), "--quiet"])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("flextok quickstart: error:")


def _echo_module(tmp_path: Path) -> str:
    """A real module that prints the argv it received, as JSON, and logs to stderr."""
    (tmp_path / "argv_echo.py").write_text(
        "import json, sys\n"
        "print('a log line', file=sys.stderr)\n"
        "print('WARNING: something a user should see', file=sys.stderr)\n"
        "print('ARGV', json.dumps(sys.argv[1:]))\n"
        "sys.exit(int(sys.argv[-1] == 'fail'))\n"
    )
    return "argv_echo"


@pytest.mark.parametrize("args", [
    ("--prompts", "grinning face", "red heart", "it's \"quoted\"", "$HOME", "a;b", "back\\slash"),
    ("--out", "/tmp/with space/out dir", "--limit", 3),
])
def test_every_printed_command_parses_back_to_the_argv_it_ran(tmp_path, args):
    module = _echo_module(tmp_path)
    console = io.StringIO()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    stages = Stages(2, env, tmp_path / "logs", console=console)
    stages.run("echo", module, *args)
    stages.run("echo again", module, "--x", Path("p q"))
    printed = console.getvalue().splitlines()
    commands = [line.strip()[2:] for line in printed if line.strip().startswith("$ ")]
    received = [json.loads(line.strip()[5:]) for line in printed if line.strip().startswith("ARGV ")]
    assert len(commands) == 2 and len(received) == 2
    for command, argv in zip(commands, received):
        parsed = shlex.split(command)
        assert parsed[:3] == [sys.executable, "-m", module]  # the interpreter: paste it and it runs
        assert parsed[3:] == argv
    assert received[0] == [str(a) for a in args]
    # the job's summary (stdout) and its warnings are shown; other log lines go to the stage's log
    assert any("WARNING: something a user should see" in line for line in printed)
    assert not any("a log line" in line for line in printed)
    logs = sorted((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 2 and "a log line" in logs[0].read_text()


def test_a_failed_stage_shows_the_end_of_its_log_and_stops(tmp_path):
    module = _echo_module(tmp_path)
    console = io.StringIO()
    stages = Stages(1, {**os.environ, "PYTHONPATH": str(tmp_path)}, tmp_path / "logs", console=console)
    with pytest.raises(StageFailed, match=r"stage 1/1 \(breaks\) failed with exit status 1; its log: "):
        stages.run("breaks", module, "fail")
    assert "a log line" in console.getvalue()  # hidden while it ran, shown once it failed


def test_help_names_the_default_output_folder_outside_the_checkout(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DEFAULT_OUT})" in help_text
    root = Path(__file__).resolve().parents[2]
    assert not DEFAULT_OUT.resolve().is_relative_to(root)
