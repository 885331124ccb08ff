"""benchmarks/bench_pipeline.py --smoke runs every section end to end (both corpora, the plain loop,
both pool sizings, the 2-node cluster, the extras, the projection), so the one measurement on a quiet
machine is not spent finding a broken script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_pipeline_smoke_measures_both_corpora_and_the_cluster(tmp_path, subprocess_env):
    out = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_pipeline", "--smoke", "--cpus", "2", "--out", str(out)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    corpora = list(result["ratios"])
    assert len(corpora) == 2 and "PNG" in corpora[0] and "JPEG" in corpora[1]
    for corpus in corpora:
        runs = [r for r in result["rows"] if r["corpus"] == corpus]
        assert len(runs) == 4  # plain loop, default pool, previous sizing, 2-node cluster
        assert all(r["images"] == 96 for r in runs), runs  # every image of the smoke corpus, in every contender
        plain = next(r for r in runs if r["contender"].startswith("plain loop"))
        default = next(r for r in runs if r["contender"].startswith("pipeline, default pool"))
        cluster = next(r for r in runs if r["contender"].startswith("2-node cluster"))
        # One single-thread encoder per CPU, on one node and across the two (1 + 1 CPUs)
        assert default["pool"].startswith("2 x 0.5 CPU") and cluster["pool"].startswith("2 x 0 CPU"), runs
        ratios = result["ratios"][corpus]
        # The report rounds ratios to 3 decimals and rates to 2: compare within that rounding, not relatively
        # (a smoke-sized ratio of 0.0345 is stored as 0.035, 1.4 % off).
        assert ratios["pipeline"] == pytest.approx(default["images_per_s"] / plain["images_per_s"], rel=1e-2, abs=1e-3)
        assert ratios["cluster"] == pytest.approx(cluster["images_per_s"] / plain["images_per_s"], rel=1e-2, abs=1e-3)
        assert all(len(r["load"]) == 2 for r in runs)
    # One single-thread encoder per core, all at once: a rate (their sum), reported beside the threads
    assert result["bare_processes"] > 0 and set(result["bare_encoder"]) == {"1", "2"}
    text = out.read_text()
    assert "2 single-thread processes at once" in text
    assert "| corpus | contender | images |" in text and "vs plain loop" in text
    assert "Sweep on 64 JPEGs" in text and "| d18_d28 |" in text  # extras and the projection ran
