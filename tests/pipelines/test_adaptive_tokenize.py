"""Adaptive-length tokenization: the actor stage, the shard summary, and the whole pipeline on real
Fashion-MNIST images with the shipped tokenizer (each stored prefix re-decoded on its own meets its
target)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pipeline_helpers import read_output

import flextok
from flextok.adaptive import LengthTarget
from pipelines.encode import TokenizeBatch
from pipelines.model import load_model
from pipelines.schema import (
    ADAPTIVE_ENCODED_SCHEMA,
    ADAPTIVE_TOKEN_SCHEMA,
    DECODED_SCHEMA,
    ENCODED_SCHEMA,
    TOKEN_SCHEMA,
    read_file_metadata,
)
from pipelines.tokenize import TokenizeConfig, run_tokenize

FM_TOKENIZER = str(Path(flextok.__file__).parent / "assets" / "fashion-mnist" / "tokenizer.safetensors")
TARGET = LengthTarget(max_relative_error=0.2, candidates="pow2")


@pytest.fixture(scope="module")
def fm_images(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    from pipelines.corpus import build_corpus
    from pipelines.images import read_corpus

    root = tmp_path_factory.mktemp("fm") / "test"
    build_corpus("fashion-mnist", root, split="test", limit=24, samples_per_shard=12)
    images = read_corpus(str(root), 28).images.permute(0, 2, 3, 1).numpy()  # (N, 28, 28, 3) uint8
    return root, list(images)


def _decoded(images: list[np.ndarray | None]) -> pa.Table:
    rows = [{"shard": "s", "index": i, "total": -1, "key": f"s/{i}", "source": "u",
             "pixels": None if img is None else img.tobytes(), "error": None if img is not None else "bad: x",
             "stage": None if img is not None else "decode", "width": 28, "height": 28}
            for i, img in enumerate(images)]
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def _alone_mse(model, image: np.ndarray, tokens, seed: int = 0) -> float:
    """Latent MSE of a stored prefix decoded on its own (one Euler step, the measurement's seed)."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    latents = model.detokenize_latents(torch.tensor([list(tokens)]), steps=1, generator=torch.Generator().manual_seed(seed))
    return (latents - x).pow(2).mean().item()


def test_stage_stores_the_chosen_prefix_and_its_quality(fm_images):
    _, images = fm_images
    stage = TokenizeBatch(FM_TOKENIZER, length_target=TARGET, num_threads=1)
    # adaptive length needs the flow decoder; plain tokenizing loads the encoder only
    assert stage.model.decoder is not None and TokenizeBatch(FM_TOKENIZER).model.decoder is None
    out = stage(_decoded([images[0], None, images[1], images[2]]))
    assert out.schema.equals(ADAPTIVE_ENCODED_SCHEMA)
    model = load_model(FM_TOKENIZER)
    x = torch.from_numpy(np.stack(images[:3])).permute(0, 3, 1, 2).float() / 127.5 - 1
    found = model.tokenize_adaptive(x, TARGET)
    rows = [r for r in out.to_pylist() if r["error"] is None]
    assert [r["tokens"] for r in rows] == [p.tolist() for p in found.prefixes()]
    assert [r["chosen_num_tokens"] for r in rows] == found.num_tokens.tolist()
    assert [r["reconstruction_mse"] for r in rows] == pytest.approx(found.mse.tolist(), rel=1e-6)
    assert [len(r["candidate_mse"]) for r in rows] == [6, 6, 6]  # 1, 2, 4, 8, 16, 32
    bad = out.to_pylist()[1]
    assert bad["tokens"] is None and bad["chosen_num_tokens"] is None and bad["error"] == "bad: x"
    # --adaptive-keep-all: all K tokens, the same chosen length recorded
    kept = TokenizeBatch(FM_TOKENIZER, length_target=TARGET, keep_all_tokens=True)(_decoded(images[:3])).to_pylist()
    assert [len(r["tokens"]) for r in kept] == [32, 32, 32]
    assert [r["chosen_num_tokens"] for r in kept] == found.num_tokens.tolist()


def test_stage_refuses_mixed_settings():
    with pytest.raises(ValueError, match="exclude"):
        TokenizeBatch(FM_TOKENIZER, length_target=TARGET, max_tokens=8)
    with pytest.raises(ValueError, match="needs a length_target"):
        TokenizeBatch(FM_TOKENIZER, keep_all_tokens=True)
    with pytest.raises(ValueError, match="exceeds"):
        TokenizeBatch(FM_TOKENIZER, length_target=LengthTarget(max_error=0.1, candidates=(4, 64)))
    with pytest.raises(ValueError, match="exclude"):
        TokenizeConfig(input="a", output="b", max_tokens=4, length_target=TARGET)


@pytest.fixture(scope="module")
def adaptive_run(ray_local, fm_images, tmp_path_factory):
    root, _ = fm_images
    out = tmp_path_factory.mktemp("adaptive") / "dst"
    cfg = TokenizeConfig(input=str(root), output=str(out), model=FM_TOKENIZER, batch_size=8, length_target=TARGET)
    return cfg, run_tokenize(cfg)


@pytest.mark.slow
def test_every_stored_prefix_meets_its_target_decoded_alone(adaptive_run, fm_images):
    cfg, result = adaptive_run
    _, images = fm_images
    rows, _ = read_output(cfg.output)
    assert rows.schema.remove_metadata().equals(ADAPTIVE_TOKEN_SCHEMA)
    meta = read_file_metadata(pq.read_schema(next(Path(cfg.output).glob("part-*.parquet"))))
    assert meta["length_target"]["max_relative_error"] == 0.2 and meta["length_target"]["candidate_lengths"][-1] == 32
    model = load_model(FM_TOKENIZER)
    lengths = rows.column("num_tokens").to_pylist()
    assert np.mean(lengths) < 32 and lengths == rows.column("chosen_num_tokens").to_pylist()
    for key, tokens, mse, full in zip(rows.column("key").to_pylist(), rows.column("tokens").to_pylist(),
                                      rows.column("reconstruction_mse").to_pylist(),
                                      rows.column("full_reconstruction_mse").to_pylist()):
        image = images[_index_of(key)]
        alone = _alone_mse(model, image, tokens)
        assert alone == pytest.approx(mse, rel=1e-4)
        assert alone <= 1.2 * full * (1 + 1e-5)
    adaptive = result.manifest["adaptive"]
    assert sum(adaptive["chosen_length_histogram"].values()) == 24
    assert adaptive["mean_tokens"] == pytest.approx(np.mean(lengths), abs=1e-3)
    assert [q["num_tokens"] for q in adaptive["quality_vs_length"]] == [1, 2, 4, 8, 16, 32]
    assert adaptive["quality_vs_length"][-1]["mean_mse"] == pytest.approx(adaptive["mean_full_mse"], rel=1e-4)
    assert adaptive["quality_vs_length"][-1]["share_chosen_at_most"] == 1.0
    assert (Path(cfg.output) / adaptive["examples"]).stat().st_size > 1000
    assert "tokens per image on average" in result.summary()


def _index_of(key: str) -> int:
    """Corpus position of a row: its sample key is test<position>."""
    return int(re.sub(r"\D", "", key.rsplit("/", 1)[-1]))


@pytest.mark.slow
def test_rerun_with_another_target_is_refused_and_same_does_nothing(adaptive_run):
    cfg, result = adaptive_run
    again = run_tokenize(cfg)
    assert again.nothing_to_do
    other = TokenizeConfig(input=cfg.input, output=cfg.output, model=FM_TOKENIZER, batch_size=8,
                           length_target=LengthTarget(max_relative_error=0.5, candidates="pow2"))
    with pytest.raises(ValueError, match="length_target"):
        run_tokenize(other)
    with pytest.raises(ValueError, match="length_target"):
        run_tokenize(TokenizeConfig(input=cfg.input, output=cfg.output, model=FM_TOKENIZER))


def test_plain_rows_keep_the_old_schema():
    from pipelines.schema import token_rows

    assert token_rows(ENCODED_SCHEMA.empty_table()).schema.equals(TOKEN_SCHEMA)
    assert token_rows(ADAPTIVE_ENCODED_SCHEMA.empty_table(), adaptive=True).schema.equals(ADAPTIVE_TOKEN_SCHEMA)
    assert json.loads(json.dumps(TARGET.describe()))["candidates"] == "pow2"
