"""benchmarks/gpu_check.py runs every section end to end on CPU (--smoke), so the one GPU run a
session may get is not spent finding a broken script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path, subprocess_env):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert {"env", "tokens", "encoder", "actor", "decode", "train"} <= set(figures)
    assert not any(isinstance(v, dict) and "error" in v for v in figures.values()), figures
    tokens = figures["tokens"]
    # On a CPU, TF32 does not exist (no change), and bf16 autocast moves some of the trained
    # tokenizer's tokens (about 2% of tokens in half the images, as the review measured).
    assert tokens["tf32"]["tokens_changed_pct"] == 0
    assert 0 < tokens["bf16"]["tokens_changed_pct"] < 20
    for depth in ("d12", "d18"):
        assert {"masked", "split", "split compiled"} <= set(figures["encoder"][depth])
        assert all(row["images_per_s"] > 0 for row in figures["encoder"][depth].values())
    assert set(figures["train"]["tiny"]) == {"replicated", "fsdp"}
    assert "sections ran, 0 failed" in proc.stdout
