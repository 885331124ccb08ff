"""`--init s3://...`: the training jobs start from a checkpoint on S3 (moto's server on 127.0.0.1),
fetched once per node through the checkpoint cache the tokenize actors use and checked by sha256."""

from __future__ import annotations

import json

import pytest
import torch

from flextok import FlexTok
from flextok.checkpoint import file_sha256
from flextok.config import TokenizerObjective, get_preset
from flextok.generator import Generator
from flextok.gpt import GPTConfig
from flextok.tokenizer import OBJECTIVE_KEY
from jobs.train_tokenizer import build_parser, model_config, objective
from training.runs import resolve_init
from training.tasks import GeneratorTask, TokenizerTask

pytestmark = pytest.mark.slow  # moto server


def _upload(s3_server, path, key: str) -> str:
    bucket = s3_server.make_bucket("init")
    s3_server.filesystem().put_file(str(path), f"{bucket}/{key}")
    return f"s3://{bucket}/{key}"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_tokenizer_init_from_s3_builds_the_checkpoint_on_every_node(s3_server, tmp_path, monkeypatch):
    torch.manual_seed(3)
    start = FlexTok.from_config(get_preset("tiny"))
    trained_with = TokenizerObjective(uniform_time_fraction=0.0)
    path = start.save_pretrained(tmp_path / "start.safetensors", extra={OBJECTIVE_KEY: trained_with.to_dict()})
    url = _upload(s3_server, path, "runs/tok/model.safetensors")
    opts = s3_server.storage_options
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "driver-node"))
    args = build_parser().parse_args(["--data", "x", "--output", "y", "--init", url, "--storage-options",
                                      json.dumps(opts), "--uniform-time-fraction", "0.5"])
    init, local, sha = resolve_init(args.init, args.storage_options)
    assert init == url and sha == file_sha256(path) and local.startswith(str(tmp_path / "driver-node"))
    config = model_config(args, local)
    assert config == start.config  # the architecture is --init's; the objective is --init's, then the flag
    assert objective(args, local) == trained_with.replace(uniform_time_fraction=0.5)
    task = TokenizerTask(config=config, preset=None, objective=objective(args, local), init_path=init,
                         init_sha256=sha, init_storage_options=opts)
    assert task.describe()["init"] == url  # the run records where it started, not a cache path
    assert "secret" not in repr(task)

    # A worker on another node: its own cache, filled from S3, checked against the driver's sha256.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "worker-node"))
    torch.manual_seed(4)
    assert _same_weights(task.build_model("cpu"), start)
    assert list((tmp_path / "worker-node").rglob("model.safetensors"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "third-node"))
    with pytest.raises(ValueError, match="does not have the sha256"):  # replaced on S3 after the driver read it
        TokenizerTask(config=config, preset=None, init_path=init, init_sha256="0" * 64,
                      init_storage_options=opts).build_model("cpu")


def test_train_generator_init_from_a_run_folder_on_s3(s3_server, tmp_path, monkeypatch):
    torch.manual_seed(5)
    config = GPTConfig(codebook_size=1000, max_tokens=8, dim=32, depth=1, num_heads=2, num_classes=3)
    start = Generator(config)
    path = start.save_pretrained(tmp_path / "model.safetensors")
    url = _upload(s3_server, path, "runs/gpt/model.safetensors").rsplit("/", 1)[0]  # the run folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "driver-node"))
    init, local, sha = resolve_init(url, s3_server.storage_options)
    assert (init, sha) == (url, file_sha256(path))
    task = GeneratorTask(config=Generator.from_pretrained(local).config, tokenizer_id="t", tokenizer_sha256=None,
                         init_path=init, init_sha256=sha, init_storage_options=s3_server.storage_options)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "worker-node"))
    assert _same_weights(task.build_model("cpu"), start)


def test_a_missing_init_url_is_one_clear_error(s3_server):
    bucket = s3_server.make_bucket("init")
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: s3://{bucket}/nothing"):
        resolve_init(f"s3://{bucket}/nothing.safetensors", s3_server.storage_options)
