"""`flextok evaluate`: tokenizer, generator and train-classifier modes on real Fashion-MNIST shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import flextok
from flextok import FlexTok, viz
from flextok.checkpoint import read_metadata
from flextok.classifier import Classifier, ClassifierConfig
from flextok.evaluation import pow2_ks, reconstruction_metrics, reference_floor_fid
from flextok.generator import Generator
from flextok.gpt import GPTConfig
from flextok.metrics import FeatureStats, frechet_distance_stats
from jobs import evaluate
from pipelines.corpus import build_corpus

K = 8
FAST = ["--quiet", "--batch-size", "16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """24 real test-split images in 2 shards, a tiny tokenizer, a class generator on it, a small judge."""
    root = tmp_path_factory.mktemp("evaluate")
    build_corpus("fashion-mnist", root / "corpus", split="test", limit=24, samples_per_shard=12)
    torch.manual_seed(0)
    tok = FlexTok.from_preset("tiny", num_registers=K, encoder_depth=1, decoder_depth=1, encoder_dim=64,
                              decoder_dim=64).eval()
    tok_path = tok.save_pretrained(root / "tokenizer.safetensors")
    gen = Generator(GPTConfig.for_tokenizer(tok.config, depth=1, dim=32, num_heads=2, num_classes=10),
                    tokenizer_id=str(tok_path), tokenizer_sha256=tok.checkpoint_sha256)
    gen_path = gen.save_pretrained(root / "generator.safetensors")
    judge = Classifier.from_config(ClassifierConfig(num_classes=10, widths=(8, 16), feature_dim=16))
    judge_path = judge.save_pretrained(root / "judge.safetensors")
    return {"root": root, "corpus": root / "corpus", "tokenizer": tok_path, "generator": gen_path, "judge": judge_path}


def _run(argv: list) -> int:
    return evaluate.main([str(a) for a in argv])


def test_pow2_ks():
    assert pow2_ks(32) == [1, 2, 4, 8, 16, 32]
    assert pow2_ks(1) == [1]
    assert pow2_ks(12) == [1, 2, 4, 8, 12]


def test_reference_floor_is_small_for_real_images_and_none_when_too_few():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 4, generator=g, dtype=torch.float64)
    floor = reference_floor_fid(features, 100)
    assert 0 <= floor < 0.5  # vs 4.0 for the same set shifted by 1 in every dimension
    assert reference_floor_fid(features[:3], 100) is None


def test_mean_image_baseline_is_closed_form():
    """Two images c ± δ have mean c: the baseline PSNR is 10 log10(4 / δ²) for each."""
    tok = FlexTok.from_preset("tiny", num_registers=2, encoder_depth=1, decoder_depth=1, encoder_dim=64,
                              decoder_dim=64).eval()
    delta = 0.25
    images = torch.stack([torch.full((3, 32, 32), 0.1 + delta), torch.full((3, 32, 32), 0.1 - delta)])
    result = reconstruction_metrics(tok, images, [1, 2], steps=1, grid_images=1)
    assert result.mean_image_psnr == pytest.approx(10 * torch.log10(torch.tensor(4 / delta**2)).item(), rel=1e-5)
    assert result.grid.shape == (1, 3, 3, 32, 32)  # 1 row: original, k=1, k=2
    assert torch.equal(result.grid[0, 0], images[0])  # the row starts with the original itself
    assert len(result.psnr) == 2 and all(p > 0 for p in result.psnr)


def test_evaluate_tokenizer_writes_numbers_plot_grid_and_report(setup, tmp_path, capsys):
    out = tmp_path / "report"
    rc = _run(["tokenizer", "--tokenizer", setup["tokenizer"], "--data", setup["corpus"], "--out", out,
               "--max-images", 20, "--steps", 2, "--classifier", setup["judge"], "--grid-images", 4, *FAST])
    assert rc == 0, capsys.readouterr().err
    assert "evaluate tokenizer: PSNR" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 20
    assert [r["k"] for r in metrics["per_k"]] == [1, 2, 4, 8]
    for row in metrics["per_k"]:
        # PSNR is the mean of per-image PSNRs: finite, and (Jensen) at least the PSNR of the mean MSE.
        assert 0 < row["mse"] < 4 and math.isfinite(row["psnr"])
        assert row["psnr"] >= 10 * math.log10(4 / row["mse"]) - 1e-9
        assert 0.0 <= row["classifier_accuracy"] <= 1.0
        assert row["fid"] > 0  # an untrained decoder's output is far from the originals in any feature space
    assert metrics["fid_feature_space"] == "classifier" and "not comparable" in metrics["fid_feature_space_description"]
    assert 0.0 <= metrics["originals_classifier_accuracy"] <= 1.0
    assert metrics["mean_image_psnr"] > 5  # Fashion-MNIST around its mean image: roughly 10 dB
    grid = Image.open(out / "reconstructions.png")
    assert grid.size == viz.grid_size(4, 1 + 4, 64, col_labels=True)
    assert Image.open(out / "psnr_vs_k.png").format == "PNG"
    assert (out / "accuracy_vs_k.png").is_file() and (out / "rfid_vs_k.png").is_file()
    report = (out / "report.md").read_text()
    assert "| 8 |" in report and "![psnr_vs_k.png](psnr_vs_k.png)" in report


def test_decoder_apg_reaches_the_decoder_and_the_report(setup, tmp_path, capsys):
    """`--apg` (tokenizer) and `--decoder-apg` (generator) decode with APG, not plain CFG, and say so."""
    shipped = Path(flextok.__file__).parent / "assets" / "fashion-mnist" / "tokenizer.safetensors"  # a random
    mse = {}  # tokenizer's zero-initialised decoder ignores its tokens: guided = unguided, whatever the rule
    for name, extra in (("cfg", []), ("apg", ["--apg"])):
        rc = _run(["tokenizer", "--tokenizer", shipped, "--data", setup["corpus"], "--out", tmp_path / name,
                   "--max-images", 4, "--ks", "8", "--steps", 2, "--guidance", 3, "--grid-images", 2, *extra, *FAST])
        assert rc == 0, capsys.readouterr().err
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["apg"] is (name == "apg") and metrics["guidance"] == 3
        assert ("(APG)" in (tmp_path / name / "report.md").read_text()) is (name == "apg")
        mse[name] = metrics["per_k"][0]["mse"]
    assert mse["apg"] != pytest.approx(mse["cfg"], rel=1e-4)  # same noise, another guidance rule
    rc = _run(["generator", "--generator", setup["generator"], "--data", setup["corpus"], "--out", tmp_path / "gen",
               "--classifier", setup["judge"], "--num-samples", 4, "--tokens-list", "2", "--decoder-steps", 1,
               "--decoder-guidance", 2, "--decoder-apg", "--grid-conditions", 2, *FAST])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "gen" / "metrics.json").read_text())["sampling"]["decoder_apg"] is True
    assert "(APG)" in (tmp_path / "gen" / "report.md").read_text()


def test_evaluate_generator_in_classifier_space(setup, tmp_path, capsys):
    out = tmp_path / "gen"
    rc = _run(["generator", "--generator", setup["generator"], "--data", setup["corpus"], "--out", out,
               "--classifier", setup["judge"], "--num-samples", 12, "--tokens-list", "1,8", "--decoder-steps", 1,
               "--grid-conditions", 3, *FAST])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "in classifier space" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid_feature_space"] == "classifier"
    assert [r["k"] for r in metrics["per_k"]] == [1, 8]
    # FID is clamped at 0, so ">= 0" could not fail: an untrained generator's samples must be farther from
    # the data than the data's own halves are from each other, and that floor is above 0 for finite sets.
    assert 0 < metrics["reference_floor_fid"] < math.inf
    for row in metrics["per_k"]:
        assert row["fid"] > metrics["reference_floor_fid"] and 0.0 <= row["class_accuracy"] <= 1.0
    assert "not comparable with Inception" in (out / "report.md").read_text()
    assert Image.open(out / "samples.png").size == viz.grid_size(3, 2, 64, row_labels=True, col_labels=True)


@pytest.mark.slow
def test_evaluate_generator_in_inception_space_from_a_converted_file(setup, tmp_path, capsys):
    from flextok.inception import InceptionV3Features

    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    save_file(InceptionV3Features().state_dict(), str(weights))  # what a user's .pth conversion holds
    out = tmp_path / "gen"
    rc = _run(["generator", "--generator", setup["generator"], "--data", setup["corpus"], "--out", out,
               "--inception-weights", weights, "--num-samples", 4, "--max-images", 8, "--tokens-list", "2",
               "--decoder-steps", 1, *FAST])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid_feature_space"] == "inception-v3-pool3"
    assert metrics["per_k"][0]["class_accuracy"] is None  # no judge given
    assert "Inception-v3 pool3" in (out / "report.md").read_text()


def test_train_classifier_writes_a_checkpoint_and_reports_accuracy(setup, tmp_path, capsys):
    out = tmp_path / "judge.safetensors"
    rc = _run(["train-classifier", "--data", setup["corpus"], "--out", out, "--epochs", 1, "--widths", "8,16",
               "--val-fraction", 0.25, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "held-out accuracy" in capsys.readouterr().out
    md = read_metadata(out)
    assert md["kind"] == "Classifier" and int(md["held_out_images"]) == 6 and int(md["train_images"]) == 18
    model = Classifier.from_pretrained(out)
    assert model.class_names[0] == "T-shirt/top"  # from the corpus's dataset.json


@pytest.mark.slow
def test_train_classifier_learns_fashion_mnist(tmp_path, capsys):
    build_corpus("fashion-mnist", tmp_path / "train", split="train", limit=3000)
    build_corpus("fashion-mnist", tmp_path / "test", split="test", limit=500)
    out = tmp_path / "judge.safetensors"
    assert _run(["train-classifier", "--data", tmp_path / "train", "--val-data", tmp_path / "test", "--out", out,
                 "--epochs", 3, "--quiet"]) == 0
    assert float(read_metadata(out)["held_out_accuracy"]) > 0.7  # chance is 0.10


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generator", "--generator", "{generator}", "--data", "{corpus}", "--out", "{tmp}"], "needs a feature network"),
        (["generator", "--generator", "{generator}", "--data", "{corpus}", "--out", "{tmp}",
          "--inception-weights", "{tmp}/pt_inception.pth"], "pickle-based"),
        (["tokenizer", "--tokenizer", "{tokenizer}", "--data", "{tmp}/missing", "--out", "{tmp}"], "input not found"),
        (["tokenizer", "--tokenizer", "{tmp}/none.safetensors", "--data", "{corpus}", "--out", "{tmp}"],
         "no such checkpoint"),
        (["tokenizer", "--tokenizer", "{tokenizer}", "--data", "{corpus}", "--out", "{tmp}", "--ks", "1,9"],
         "exceeds the tokenizer's K = 8"),
        (["generator", "--generator", "{judge}", "--data", "{corpus}", "--out", "{tmp}", "--classifier", "{judge}"],
         "expected a 'Generator'"),
    ],
)
def test_errors_are_one_line(setup, tmp_path, capsys, argv, message):
    (tmp_path / "pt_inception.pth").write_bytes(b"\x80\x02}q\x00.")  # a pickle header
    values = {k: str(v) for k, v in setup.items()} | {"tmp": str(tmp_path)}
    assert _run([a.format(**values) for a in argv] + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flextok evaluate: error: ") and message in err and err.count("\n") == 1


def test_reconstruction_fid_per_k_in_the_given_feature_space():
    """A feature network that sees only the mean colour of flat images: an untrained decoder does not
    keep the colours, so every k gets a clearly positive rFID, while the originals against themselves
    score 0."""

    class MeanColour(torch.nn.Module):
        feature_space = "classifier"

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def features(self, images):
            return images.mean(dim=(2, 3))  # (B, 3)

    tok = FlexTok.from_preset("tiny", num_registers=2, encoder_depth=1, decoder_depth=1, encoder_dim=64,
                              decoder_dim=64).eval()
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 3, 1, 1, generator=g) * 2 - 1).expand(40, 3, 32, 32).contiguous()
    result = reconstruction_metrics(tok, images, [1, 2], steps=1, grid_images=0, feature_net=MeanColour())
    assert result.feature_space == "classifier" and len(result.fid) == 2
    assert all(f > 0.05 for f in result.fid)  # random decoder: colours do not survive
    same = FeatureStats.of(MeanColour().features(images).double())
    assert frechet_distance_stats(same, same) == pytest.approx(0.0, abs=1e-9) and min(result.fid) > 1e3 * 1e-9


def test_tokens_saved_at_equal_quality_by_hand():
    from types import SimpleNamespace

    from jobs.evaluate import _equal_quality

    baseline = {"generator": {"checkpoint_id": "fixed.safetensors"}, "per_k": [
        {"k": 1, "fid": 50.0, "class_accuracy": 0.5}, {"k": 4, "fid": 20.0, "class_accuracy": 0.85},
        {"k": 8, "fid": 12.0, "class_accuracy": 0.93}, {"k": 32, "fid": 9.0, "class_accuracy": 0.97}]}
    eos = SimpleNamespace(accuracy=[0.9], fid=[15.0], mean_tokens=[6.0])
    got = _equal_quality(baseline, eos)
    assert (got["k_for_accuracy"], got["k_for_fid"]) == (8, 8)  # 0.93 >= 0.9 first at k = 8; 12 <= 15 first at 8
    assert "25% fewer" in got["summary"]  # 6 tokens instead of 8
    better = SimpleNamespace(accuracy=[0.99], fid=[5.0], mean_tokens=[6.0])
    assert _equal_quality(baseline, better)["k_for_accuracy"] is None
    longer = SimpleNamespace(accuracy=[0.9], fid=[15.0], mean_tokens=[12.0])
    assert "50% more" in _equal_quality(baseline, longer)["summary"]  # 12 tokens where 8 do
