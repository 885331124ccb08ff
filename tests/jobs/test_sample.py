"""`flextok sample` end to end on tiny randomly initialised checkpoints saved by the test."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flextok import FlexTok, viz
from flextok.checkpoint import SAME_TOKENS_KEY, CheckpointError, file_sha256
from flextok.generator import Generator
from flextok.gpt import GPTConfig
from flextok.sampling import find_generator_checkpoint, resolve_tokenizer
from jobs import sample

NUM_CLASSES = 4
K = 8


def _tiny_tokenizer() -> FlexTok:
    torch.manual_seed(0)
    return FlexTok.from_preset(
        "tiny", num_registers=K, encoder_depth=1, decoder_depth=1, encoder_dim=64, decoder_dim=64
    ).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny tokenizer and a class-conditional generator trained on it (random weights)."""
    root = tmp_path_factory.mktemp("sample")
    tok = _tiny_tokenizer()
    tok_path = tok.save_pretrained(root / "tokenizer.safetensors")
    config = GPTConfig.for_tokenizer(tok.config, depth=1, dim=32, num_heads=2, num_classes=NUM_CLASSES)
    torch.manual_seed(1)
    gen = Generator(config, tokenizer_id=str(tok_path), tokenizer_sha256=tok.checkpoint_sha256)
    gen_path = gen.save_pretrained(root / "run" / "model.safetensors")
    return {"root": root, "tokenizer": tok_path, "generator": gen_path}


def _run(argv: list[str]) -> int:
    return sample.main([str(a) for a in argv])


FAST = ["--decoder-steps", "2", "--quiet"]


def test_sample_writes_grid_images_and_tokens(checkpoints, tmp_path, capsys):
    out, images_dir, tokens_path = tmp_path / "grid.png", tmp_path / "imgs", tmp_path / "tokens.parquet"
    labels, per, k = [0, 3, 1], 3, 5
    rc = _run(["--generator", checkpoints["root"] / "run", "--labels", "0,3", "1", "--num-tokens", k,
               "--per-condition", per, "--out", out, "--save-images", images_dir, "--save-tokens", tokens_path,
               "--seed", 7, *FAST])
    assert rc == 0, capsys.readouterr().err
    assert "9 images" in capsys.readouterr().out

    grid = Image.open(out)
    assert grid.format == "PNG"
    assert grid.size == viz.grid_size(len(labels), per, 64, row_labels=True)  # 32 px images shown at 64

    files = sorted(images_dir.glob("*.png"))
    assert len(files) == len(labels) * per
    assert files[0].name == "000-class-0_000.png" and files[-1].name == "002-class-1_002.png"
    assert Image.open(files[0]).size == (32, 32)

    table = pq.read_table(tokens_path)
    assert table.num_rows == len(labels) * per
    tokens_type = table.schema.field("tokens").type
    assert pa.types.is_list(tokens_type) and tokens_type.value_type == pa.uint16()
    assert set(table.column("num_tokens").to_pylist()) == {k}
    assert all(len(t) == k for t in table.column("tokens").to_pylist())
    assert table.column("label").to_pylist() == [c for c in labels for _ in range(per)]
    assert max(max(t) for t in table.column("tokens").to_pylist()) < 1000
    meta = table.schema.metadata
    assert meta[b"flextok.checkpoint_sha256"].decode() == file_sha256(checkpoints["tokenizer"])
    assert json.loads(meta[b"flextok.sample"])["seed"] == 7
    assert json.loads(meta[b"flextok.sample"])["precision"] == "fp32"  # auto on a CPU


def test_precision_is_recorded(checkpoints, tmp_path):
    """What --precision ran is in the tokens' metadata (tests/flextok/test_precision.py checks that
    it is applied, on the trained shipped models)."""
    tokens = tmp_path / "t.parquet"
    assert _run(["--generator", checkpoints["generator"], "--labels", "0", "--num-tokens", 4, "--per-condition", 2,
                 "--out", tmp_path / "g.png", "--save-tokens", tokens, "--precision", "bf16", *FAST]) == 0
    assert json.loads(pq.read_table(tokens).schema.metadata[b"flextok.sample"])["precision"] == "bf16"


def test_same_seed_same_tokens(checkpoints, tmp_path):
    paths = [tmp_path / f"t{i}.parquet" for i in range(2)]
    for i, p in enumerate(paths):
        assert _run(["--generator", checkpoints["generator"], "--labels", "2", "--num-tokens", 3, "--per-condition", 2,
                     "--out", tmp_path / f"g{i}.png", "--save-tokens", p, *FAST]) == 0
    a, b = (pq.read_table(p).column("tokens").to_pylist() for p in paths)
    assert a == b


def test_class_names_label_rows(checkpoints, tmp_path):
    names = tmp_path / "dataset.json"
    names.write_text(json.dumps({"class_names": ["shirt", "shoe", "bag", "hat"]}))
    out_dir = tmp_path / "imgs"
    assert _run(["--generator", checkpoints["generator"], "--labels", "Bag", "--class-names", names, "--num-tokens", 1,
                 "--per-condition", 1, "--out", tmp_path / "g.png", "--save-images", out_dir, *FAST]) == 0
    assert [p.name for p in out_dir.iterdir()] == ["000-2-bag_000.png"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "7"], "class id 7 is out of range"),
        (["--labels", "dog"], "'dog' is not a class id"),
        (["--prompts", "a red heart"], "class-conditional generator: use --labels"),
        (["--labels", "1", "--num-tokens", "9"], "exceeds this generator's K = 8"),
    ],
)
def test_bad_arguments_are_one_line_errors(checkpoints, tmp_path, capsys, extra, message):
    argv = ["--generator", checkpoints["generator"], "--out", tmp_path / "g.png", *FAST, *extra]
    if "--num-tokens" not in extra:
        argv += ["--num-tokens", "2"]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flextok sample: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert _run(["--generator", tmp_path / "nope.safetensors", "--labels", "0", "--num-tokens", "1",
                 "--out", tmp_path / "g.png"]) == 2
    err = capsys.readouterr().err
    assert "generator checkpoint not found" in err and err.count("\n") == 1


def test_tokenizer_sha_mismatch_is_a_one_line_error(checkpoints, tmp_path, capsys):
    other = _tiny_tokenizer()
    torch.nn.init.normal_(next(other.parameters()))  # same config, other weights
    other_path = other.save_pretrained(tmp_path / "other.safetensors")
    assert _run(["--generator", checkpoints["generator"], "--tokenizer", other_path, "--labels", "0",
                 "--num-tokens", "1", "--out", tmp_path / "g.png", *FAST]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "trained on" in err and err.count("\n") == 1


def test_tokenizer_found_beside_a_moved_generator_by_sha(checkpoints, tmp_path):
    """Shipped models travel together: the recorded path is gone, the file sits beside the generator."""
    tok = FlexTok.from_pretrained(checkpoints["tokenizer"])
    moved = tmp_path / "shipped"
    tok_path = tok.save_pretrained(moved / "renamed-tokenizer.safetensors")
    gen = Generator.from_pretrained(checkpoints["generator"])
    gen.tokenizer_id, gen.tokenizer_sha256 = "/gone/tokenizer.safetensors", tok.checkpoint_sha256
    gen_path = gen.save_pretrained(moved / "generator.safetensors")
    assert resolve_tokenizer(gen, gen_path) == str(tok_path)
    gen.tokenizer_sha256 = "0" * 64
    with pytest.raises(CheckpointError, match="not found; pass --tokenizer"):
        resolve_tokenizer(gen, gen_path)


def test_the_tokenizer_beside_the_generator_wins_over_another_copy_at_the_recorded_path(checkpoints, tmp_path):
    """A clone of the repository elsewhere on the machine: the generator's recorded absolute path names
    the other checkout's file; the copy travelling with the generator is the one to use."""
    gen = Generator.from_pretrained(checkpoints["generator"])
    assert Path(gen.tokenizer_id).is_file()  # the recorded path exists (the module's original)
    clone = tmp_path / "clone"
    clone.mkdir()
    beside = clone / Path(gen.tokenizer_id).name
    beside.write_bytes(Path(gen.tokenizer_id).read_bytes())
    gen_path = gen.save_pretrained(clone / "generator.safetensors")
    assert resolve_tokenizer(gen, gen_path) == str(beside)


def test_a_decoder_fine_tune_of_the_recorded_tokenizer_is_accepted(checkpoints, tmp_path):
    """A tokenizer listing the recorded sha256 among the checkpoints whose tokens it keeps decodes the
    generator's tokens (beside it, or given); one that merely claims another parent is refused."""
    tok = FlexTok.from_pretrained(checkpoints["tokenizer"])
    torch.nn.init.normal_(tok.decoder.mask_token)  # another decoder, the same tokens
    gen = Generator.from_pretrained(checkpoints["generator"])
    moved = tmp_path / "shipped"
    tuned = tok.save_pretrained(moved / "tokenizer.safetensors",
                                extra={SAME_TOKENS_KEY: [gen.tokenizer_sha256]})
    gen.tokenizer_id = "/gone/tokenizer.safetensors"
    gen_path = gen.save_pretrained(moved / "generator.safetensors")
    assert file_sha256(tuned) != gen.tokenizer_sha256
    assert resolve_tokenizer(gen, gen_path) == str(tuned)  # found beside it by lineage
    assert resolve_tokenizer(gen, gen_path, tuned) == str(tuned)
    stranger = tok.save_pretrained(tmp_path / "stranger.safetensors", extra={SAME_TOKENS_KEY: ["1" * 64]})
    with pytest.raises(CheckpointError, match="trained on"):
        resolve_tokenizer(gen, gen_path, stranger)


def test_run_folder_resolves_to_final_model_else_newest_checkpoint(checkpoints, tmp_path):
    gen = Generator.from_pretrained(checkpoints["generator"])
    run = tmp_path / "run"
    for step in (100, 200):
        gen.save_pretrained(run / f"checkpoint_{step:06d}" / "model.safetensors")
    assert find_generator_checkpoint(run) == run / "checkpoint_000200" / "model.safetensors"
    gen.save_pretrained(run / "model.safetensors")
    assert find_generator_checkpoint(run) == run / "model.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no generator checkpoint"):
        find_generator_checkpoint(tmp_path / "empty")


@pytest.mark.slow
def test_text_generator_samples_from_prompts(checkpoints, tmp_path, capsys):
    tok = FlexTok.from_pretrained(checkpoints["tokenizer"])
    config = GPTConfig.for_tokenizer(tok.config, depth=1, dim=32, num_heads=2, cond="text", num_prefix_tokens=8)
    gen = Generator(config, tokenizer_id=str(checkpoints["tokenizer"]), tokenizer_sha256=tok.checkpoint_sha256)
    gen_path = gen.save_pretrained(tmp_path / "text-gen.safetensors")
    prompts = ["a red heart", "grinning face with big eyes"]
    tokens_path, images_dir = tmp_path / "t.parquet", tmp_path / "imgs"
    rc = _run(["--generator", gen_path, "--prompts", *prompts, "--num-tokens", 2, "--per-condition", 2,
               "--out", tmp_path / "g.png", "--save-tokens", tokens_path, "--save-images", images_dir, *FAST])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "g.png").size == viz.grid_size(2, 2, 64, row_labels=True)
    assert sorted(p.name for p in images_dir.iterdir())[0] == "000-a-red-heart_000.png"
    table = pq.read_table(tokens_path)
    assert table.column("caption").to_pylist() == [p for p in prompts for _ in range(2)]
    assert table.column("label").null_count == 4
    assert _run(["--generator", gen_path, "--labels", "1", "--num-tokens", 1, "--out", tmp_path / "h.png"]) == 2
    assert "text-conditional generator: use --prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_from_a_run_folder_and_tokenizer_on_s3(checkpoints, s3_server, tmp_path, capsys, monkeypatch):
    """A run still training on S3: the newest checkpoint is fetched (once: then from the cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bucket = s3_server.make_bucket("samplerun")
    fs = s3_server.filesystem()
    older = Generator.from_pretrained(checkpoints["generator"])
    torch.manual_seed(5)
    for p in older.parameters():  # a different older checkpoint: must not be the one used
        p.data.normal_()
    older_path = older.save_pretrained(tmp_path / "older.safetensors")
    fs.put_file(str(older_path), f"{bucket}/run/checkpoint_00000001/model.safetensors")
    fs.put_file(str(checkpoints["generator"]), f"{bucket}/run/checkpoint_00000002/model.safetensors")
    fs.put_file(str(checkpoints["tokenizer"]), f"{bucket}/tok/tokenizer.safetensors")
    argv = ["--generator", f"s3://{bucket}/run", "--tokenizer", f"s3://{bucket}/tok/tokenizer.safetensors",
            "--labels", "1", "--num-tokens", 3, "--per-condition", 2,
            "--storage-options", json.dumps(s3_server.storage_options), *FAST]
    assert _run([*argv, "--out", tmp_path / "grid.png"]) == 0, capsys.readouterr().err
    cached = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert {file_sha256(p) for p in cached} == {file_sha256(checkpoints["generator"]), file_sha256(checkpoints["tokenizer"])}
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert _run([*argv, "--out", tmp_path / "again.png"]) == 0
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").rglob("*.safetensors"))] == mtimes
    assert Image.open(tmp_path / "grid.png").size == Image.open(tmp_path / "again.png").size
    bad = ["--generator", f"s3://{bucket}/nothing", "--labels", "1", "--num-tokens", 3, "--out", tmp_path / "x.png",
           "--storage-options", json.dumps(s3_server.storage_options), "--quiet"]
    assert _run(bad) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flextok sample: error: checkpoint not found") and s3_server.secret not in "".join(err)


@pytest.mark.parametrize("flag", ["--cfg-scale", "--decoder-guidance"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_guidance_is_refused_by_the_parser(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:  # --cfg-scale nan used to end in a traceback
        _run(["--generator", tmp_path / "g.safetensors", "--labels", "0", "--num-tokens", "1",
              "--out", tmp_path / "g.png", f"{flag}={value}"])
    assert exc.value.code == 2 and f"{flag}: expected a finite number, got {float(value):g}" in capsys.readouterr().err


def test_an_eos_generator_stops_each_sample_and_saves_ragged_rows(checkpoints, tmp_path, capsys):
    tok = FlexTok.from_pretrained(checkpoints["tokenizer"])
    config = GPTConfig.for_tokenizer(tok.config, depth=1, dim=32, num_heads=2, num_classes=NUM_CLASSES, use_eos=True)
    torch.manual_seed(2)
    gen = Generator(config, tokenizer_id=str(checkpoints["tokenizer"]), tokenizer_sha256=tok.checkpoint_sha256)
    rows = [torch.tensor([5, 6]), torch.tensor([7, 8, 9, 10, 11])]  # class 0 ends after 2 tokens, class 1 after 5
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-2)
    for _ in range(60):
        loss = gen(rows * 4, [0, 1] * 4, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen_path = gen.eval().save_pretrained(tmp_path / "eos" / "model.safetensors")
    tokens_path = tmp_path / "tokens.parquet"
    rc = _run(["--generator", gen_path, "--labels", "0", "1", "--per-condition", 3, "--out", tmp_path / "g.png",
               "--save-tokens", tokens_path, "--temperature", 0, *FAST])  # no --num-tokens: the cap is K
    assert rc == 0, capsys.readouterr().err
    assert "k chosen by the generator: mean 3.5, 2..5 of at most 8" in capsys.readouterr().out
    table = pq.read_table(tokens_path)
    assert table.column("num_tokens").to_pylist() == [2, 2, 2, 5, 5, 5]
    assert table.column("tokens").to_pylist() == [[5, 6]] * 3 + [[7, 8, 9, 10, 11]] * 3
