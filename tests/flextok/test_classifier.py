"""The project's judge network: config, checkpoints, and learning real Fashion-MNIST labels."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flextok.checkpoint import CheckpointError, read_metadata
from flextok.classifier import (
    Classifier,
    ClassifierConfig,
    augment,
    evaluate_classifier,
    to_float_images,
    train_classifier,
)
from pipelines.corpus import FASHION_MNIST_CLASSES, fashion_mnist_arrays


def fashion_mnist(split: str, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n real images as uint8 (n, 3, 32, 32) (bicubic 28 -> 32, grey -> RGB) and their labels."""
    images, labels = fashion_mnist_arrays(split)
    x = torch.from_numpy(images[offset : offset + n].copy()).float()[:, None]  # (n, 1, 28, 28)
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 255).round()
    return x.to(torch.uint8).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels[offset : offset + n].astype("int64"))


SMALL = ClassifierConfig(num_classes=10, widths=(16, 32), feature_dim=32, dropout=0.0)


def test_config_validates_and_round_trips():
    assert ClassifierConfig.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL
    with pytest.raises(ValueError, match="num_classes"):
        ClassifierConfig(num_classes=1)
    with pytest.raises(ValueError, match="divisible"):
        ClassifierConfig(num_classes=3, image_size=30)
    with pytest.raises(ValueError, match="unknown"):
        ClassifierConfig.from_dict({"num_classes": 3, "depth": 2})


def test_features_and_logits_shapes_and_resizing():
    model = Classifier.from_config(SMALL).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    assert model.features(x).shape == (5, 32)
    assert model(x).shape == (5, 10)
    assert model(torch.rand(2, 3, 28, 28) * 2 - 1).shape == (2, 10)  # resized to 32
    with pytest.raises(ValueError, match="images must be"):
        model(torch.zeros(2, 1, 32, 32))


def test_checkpoint_round_trip_keeps_outputs_and_class_names(tmp_path):
    model = Classifier.from_config(SMALL, class_names=FASHION_MNIST_CLASSES).eval()
    path = model.save_pretrained(tmp_path / "judge.safetensors", extra={"accuracy": 0.5})
    assert read_metadata(path)["kind"] == "Classifier"
    loaded = Classifier.from_pretrained(path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), model(x))
    assert loaded.class_names == list(FASHION_MNIST_CLASSES)
    assert loaded.config == SMALL and loaded.checkpoint_sha256 == model.checkpoint_sha256


def test_loading_another_kind_is_a_checkpoint_error(tmp_path):
    from flextok.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "x.safetensors", {"w": torch.zeros(1)}, kind="FlexTok", config={})
    with pytest.raises(CheckpointError, match="expected a 'Classifier'"):
        Classifier.from_pretrained(path)


def test_augment_keeps_shape_and_is_seeded():
    x = torch.rand(6, 3, 32, 32)
    a = augment(x, generator=torch.Generator().manual_seed(0))
    b = augment(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_to_float_images_maps_uint8_to_unit_range():
    x = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 1, 2)
    assert to_float_images(x).flatten().tolist() == [-1.0, 1.0]


def test_fits_a_fixed_batch_of_real_images():
    images, labels = fashion_mnist("train", 48)
    torch.manual_seed(0)
    model = Classifier.from_config(SMALL)
    losses = []
    result = train_classifier(model, images, labels, epochs=25, batch_size=48, lr=3e-2, use_augment=False, weight_decay=0.0,
                              generator=torch.Generator().manual_seed(0),
                              on_step=lambda step, total, loss: losses.append(loss))
    assert result.steps == 25 and len(losses) == 25
    assert losses[-1] < 0.5 * losses[0]
    assert evaluate_classifier(model, images, labels) > 0.5  # chance is 0.10


@pytest.mark.slow
def test_learns_fashion_mnist_and_generalises_to_the_test_split():
    train_x, train_y = fashion_mnist("train", 4000)
    test_x, test_y = fashion_mnist("test", 1000)
    torch.manual_seed(0)
    model = Classifier.from_config(ClassifierConfig(num_classes=10))
    train_classifier(model, train_x, train_y, epochs=3, generator=torch.Generator().manual_seed(0))
    assert evaluate_classifier(model, test_x, test_y) > 0.75  # chance is 0.10
