import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.encode import TokenizeBatch, pixels_to_array, tokens_column
from pipelines.model import load_model, resolve_model_spec
from pipelines.schema import DECODED_SCHEMA, ENCODED_SCHEMA


def _decoded(images: list[np.ndarray | None]) -> pa.Table:
    rows = []
    for i, img in enumerate(images):
        rows.append({
            "shard": "s", "index": i, "total": -1, "key": f"s/{i}", "source": "u",
            "pixels": None if img is None else img.tobytes(),
            "error": None if img is not None else "not an image: x", "stage": None if img is not None else "decode",
            "width": 40, "height": 30,
        })
    rows.append({"shard": "s", "index": -1, "total": len(images), "key": "", "source": "u"})
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_tokenize_batch_matches_the_model_and_keeps_error_rows(tiny_checkpoint):
    stage = TokenizeBatch(str(tiny_checkpoint), num_threads=1)
    images = _images(5)
    batch = _decoded([images[0], None, images[1], images[2], None, images[3], images[4]])
    out = stage(batch)
    assert out.schema.equals(ENCODED_SCHEMA)
    assert out.column("tokens").type == pa.list_(pa.uint16())
    tokens = out.column("tokens").to_pylist()
    assert [t is None for t in tokens] == [False, True, False, False, True, False, False, True]
    assert out.column("error").to_pylist()[1] == "not an image: x"
    model = load_model(str(tiny_checkpoint))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
    expected = model.tokenize(x).tolist()
    assert [t for t in tokens if t is not None] == expected
    assert len({tuple(t) for t in expected}) > 1, "the test model should not map every image alike"
    assert stage.num_encoded == 5


def test_max_tokens_stores_prefixes(tiny_checkpoint):
    full = TokenizeBatch(str(tiny_checkpoint))(_decoded(_images(3)))
    short = TokenizeBatch(str(tiny_checkpoint), max_tokens=4)(_decoded(_images(3)))
    for a, b in zip(full.column("tokens").to_pylist()[:3], short.column("tokens").to_pylist()[:3]):
        assert len(a) == 32 and b == a[:4]
    with pytest.raises(ValueError, match="max_tokens"):
        TokenizeBatch(str(tiny_checkpoint), max_tokens=33)


def test_random_presets_are_identical_in_every_actor():
    a = load_model(resolve_model_spec("tiny"))
    b = load_model(resolve_model_spec("tiny"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resolve_model_spec_errors_and_paths(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="not a preset"):
        resolve_model_spec(str(tmp_path / "missing.safetensors"))
    assert resolve_model_spec(str(tiny_checkpoint)) == str(tiny_checkpoint.resolve())
    assert resolve_model_spec(None) in ("tiny",) or resolve_model_spec(None).endswith(".safetensors")


def test_pixels_to_array_is_zero_copy_and_handles_slices():
    imgs = _images(4)
    col = pa.array([im.tobytes() for im in imgs], pa.binary())
    arr = pixels_to_array(col.slice(1, 2), 32)
    assert arr.shape == (2, 32, 32, 3) and np.array_equal(arr[0], imgs[1]) and np.array_equal(arr[1], imgs[2])
    chunked = pa.chunked_array([col.slice(0, 1), col.slice(3, 1)])
    assert np.array_equal(pixels_to_array(chunked, 32)[1], imgs[3])


def test_tokens_column_nulls_and_values():
    ids = np.array([[1, 2], [3, 4]])
    col = tokens_column(ids, np.array([True, False, True]))
    assert col.to_pylist() == [[1, 2], None, [3, 4]]
    assert col.type == pa.list_(pa.uint16())


def test_the_actor_encodes_at_its_precision(tmp_path):
    """TokenizeBatch(precision=...) runs the encoder under that precision: on the shipped (trained)
    tokenizer, bf16 moves some tokens of real held-out images and fp32 none; a bad name is refused."""
    from pathlib import Path

    import flextok
    from pipelines.corpus import build_corpus
    from pipelines.images import read_corpus

    path = str(Path(flextok.__file__).parent / "assets/fashion-mnist/tokenizer.safetensors")
    build_corpus("fashion-mnist", tmp_path / "fm", split="test", limit=48, samples_per_shard=48)
    images = read_corpus(str(tmp_path / "fm"), 28).images.permute(0, 2, 3, 1).numpy()
    tokens = {}
    for precision in ("fp32", "bf16"):
        stage = TokenizeBatch(path, num_threads=1, precision=precision)
        tokens[precision] = np.array(stage(_decoded(list(images))).column("tokens").to_pylist()[:-1])
    reference = load_model(path).tokenize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert np.array_equal(tokens["fp32"], reference.numpy())
    assert 0 < (tokens["bf16"] != tokens["fp32"]).mean() < 0.2
    with pytest.raises(ValueError, match="precision must be one of"):
        TokenizeBatch(path, precision="int8")


class PoisonedTokenizeBatch(TokenizeBatch):
    """The real stage, except that any batch holding an image whose first pixel is (1, 2, 3) fails, as
    a sample that crashes the model would (the real model accepts every uint8 image)."""

    def _tokenize(self, images):
        if any(tuple(img[0, 0]) == (1, 2, 3) for img in images):
            raise RuntimeError("poison")
        return super()._tokenize(images)


def test_failed_batch_is_retried_row_by_row_so_one_poison_sample_is_one_error_row(tiny_checkpoint):
    stage = PoisonedTokenizeBatch(str(tiny_checkpoint), num_threads=1)
    images = _images(4, seed=3)
    poison = images[2].copy()
    poison[0, 0] = (1, 2, 3)
    out = stage(_decoded([images[0], None, poison, images[1], images[3]]))
    errors, stages = out.column("error").to_pylist(), out.column("stage").to_pylist()
    assert errors[2] == "encode failed: RuntimeError: poison" and stages[2] == "encode"
    assert errors[1] == "not an image: x" and errors[0] is errors[3] is errors[4] is None
    model = load_model(str(tiny_checkpoint))
    good = [images[0], images[1], images[3]]
    x = torch.from_numpy(np.stack(good)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
    tokens = out.column("tokens").to_pylist()
    assert [tokens[i] for i in (0, 3, 4)] == model.tokenize(x).tolist() and tokens[2] is None
    assert (stage.num_encoded, stage.num_failed) == (3, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is unavailable")
def test_a_gpu_actor_without_cuda_is_an_error_not_a_silent_cpu_run(tiny_checkpoint):
    with pytest.raises(RuntimeError, match="--device cpu"):
        TokenizeBatch(str(tiny_checkpoint), device="cuda")
    assert TokenizeBatch(str(tiny_checkpoint), device="cpu").device == "cpu"  # asked for on purpose


class _SmallGPU(TokenizeBatch):
    """Stands in for a device that holds at most `capacity` images per forward (no CUDA here): the
    real tokenizer, with torch's real OutOfMemoryError above that."""

    capacity = 3

    def _tokenize(self, images):
        self.forwards = getattr(self, "forwards", []) + [len(images)]
        if len(images) > self.capacity:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._tokenize(images)


def test_cuda_out_of_memory_halves_the_batch_logged_once_never_error_rows(tiny_checkpoint, caplog):
    batch = _decoded(_images(10))
    expected = TokenizeBatch(str(tiny_checkpoint))(batch).column("tokens").to_pylist()
    enc = _SmallGPU(str(tiny_checkpoint))
    with caplog.at_level("WARNING", logger="pipelines.encode"):
        out = enc(batch)
        again = enc(batch)  # the smaller size is kept: no second out-of-memory, no second warning
    assert out.column("tokens").to_pylist() == expected == again.column("tokens").to_pylist()
    assert out.column("error").null_count == out.num_rows  # no error rows
    assert enc.forwards[:2] == [10, 5] and max(enc.forwards[2:]) <= 3 and min(enc.forwards) >= 2  # not batch 1
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 1


def test_out_of_memory_on_one_image_is_raised_not_recorded(tiny_checkpoint):
    enc = _SmallGPU(str(tiny_checkpoint))
    enc.capacity = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):
        enc(_decoded(_images(4)))
