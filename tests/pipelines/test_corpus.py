import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipelines import corpus


def test_emoji_list_has_every_fully_qualified_emoji_in_nine_groups():
    emoji, groups = corpus.read_emoji_list()
    assert len(emoji) == 3655
    assert len(groups) == 9 and groups[0] == "Smileys & Emotion" and groups[-1] == "Flags"
    assert emoji[0].name == "grinning face" and emoji[0].text == "\U0001F600"
    assert {e.group for e in emoji} == set(groups)


def test_rendered_emoji_is_colour_on_white():
    font = corpus.ImageFont.truetype(str(corpus.EMOJI_FONT), corpus.EMOJI_FONT_SIZE)
    img = corpus.render_emoji("\U0001F600", font, 32)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (32, 32, 3)
    assert np.all(arr[0, 0] == 255) and np.all(arr[-1, -1] == 255)
    centre = arr[12:20, 12:20].reshape(-1, 3)
    assert (centre.max(axis=1) - centre.min(axis=1)).max() > 100  # saturated colour, not grey


def test_emoji_samples_caption_label_and_split():
    samples = list(corpus.emoji_samples(size=16, limit=3))
    assert [s.caption for s in samples] == ["grinning face", "grinning face with big eyes",
                                            "grinning face with smiling eyes"]
    assert {s.label for s in samples} == {0}
    train = sum(1 for e in corpus.read_emoji_list()[0] if not corpus.emoji_is_test(e.name))
    assert 3000 < train < 3600


def test_fashion_mnist_standard_split_and_classes():
    images, labels = corpus.fashion_mnist_arrays("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    train_images, _ = corpus.fashion_mnist_arrays("train")
    assert train_images.shape == (60000, 28, 28)
    first = next(corpus.fashion_mnist_samples(split="test", limit=1))
    assert first.caption == corpus.FASHION_MNIST_CLASSES[first.label]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first.png))), images[0])


def test_shards_are_webdataset_and_byte_identical_on_rerun(tmp_path):
    for out in (tmp_path / "a", tmp_path / "b"):
        info = corpus.build_corpus("fashion-mnist", out, split="test", samples_per_shard=4, limit=10)
    assert info["num_samples"] == 10 and info["num_shards"] == 3
    for name in info["shards"]:
        assert hashlib.sha256((tmp_path / "a" / name).read_bytes()).digest() == \
            hashlib.sha256((tmp_path / "b" / name).read_bytes()).digest()
    with tarfile.open(tmp_path / "a" / info["shards"][0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[3]).read())
    assert names[:4] == ["test000000.png", "test000000.cls", "test000000.txt", "test000000.json"]
    assert meta["label_name"] == corpus.FASHION_MNIST_CLASSES[meta["label"]]
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["class_counts"][meta["label"]] >= 1


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus.build_corpus("mnist", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        corpus.build_corpus("emoji", tmp_path, split="val")
