"""The project's small image classifier: the judge of class accuracy and the fallback FID feature space.

Owns: `ClassifierConfig`, a compact CNN for small RGB images (32x32 by default; other sizes are
resized to the configured one), its training loop on labelled images held in memory (AdamW, one-cycle
cosine schedule, flip and shift augmentation), evaluation, and safetensors checkpoints (kind
"Classifier", with the class names in the metadata). Does not own: reading corpora (jobs), FID
(`flextok.metrics`).

Why a classifier of our own: the FID feature network of the literature (Inception-v3) has weights
that cannot ship offline; a network trained on the corpus labels gives a feature space that knows
this corpus's classes, and the same network says whether a class-conditional sample shows its class.
FIDs in this space are comparable with each other, not with published Inception FIDs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flextok.checkpoint import (
    CheckpointError,
    config_from_metadata,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger(__name__)

KIND = "Classifier"
FEATURE_SPACE = "classifier"


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Architecture: a stride-2 3x3 stem, then stages of two 3x3 conv-BN-ReLU layers (2x2 average
    pooling between stages), global average pooling, a `feature_dim` projection and a linear head.

    At 32x32 with widths (32, 64, 128) that is ~12 M multiply-adds per image: cheap enough to train on
    all of Fashion-MNIST on two CPU cores in minutes.
    """

    num_classes: int
    image_size: int = 32
    image_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.num_classes < 2:
            raise ValueError(f"ClassifierConfig.num_classes must be >= 2, got {self.num_classes}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"ClassifierConfig.widths must be positive, got {self.widths}")
        if self.image_size % 2 ** len(self.widths):
            raise ValueError(
                f"ClassifierConfig.image_size {self.image_size} must be divisible by 2^{len(self.widths)}"
            )
        if self.image_channels < 1 or self.feature_dim < 1:
            raise ValueError("ClassifierConfig.image_channels and feature_dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("ClassifierConfig.dropout must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ClassifierConfig fields: {sorted(unknown)}")
        return cls(**data)


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class Classifier(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> class logits (B, num_classes); `features` gives (B, F)."""

    feature_space = FEATURE_SPACE

    def __init__(self, config: ClassifierConfig, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.config = config
        layers, c_in = [_conv_bn(config.image_channels, config.widths[0], stride=2)], config.widths[0]
        for i, width in enumerate(config.widths):
            if i > 0:
                layers.append(nn.AvgPool2d(2))
            layers += [_conv_bn(c_in, width), _conv_bn(width, width)]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        names = list(class_names) if class_names is not None else [f"class {i}" for i in range(config.num_classes)]
        if len(names) != config.num_classes:
            raise ValueError(f"{len(names)} class names for {config.num_classes} classes")
        self.class_names = names
        self.checkpoint_id = "unsaved"
        self.checkpoint_sha256: str | None = None

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def init_weights(self) -> None:
        """Kaiming-normal convs and feature projection (ReLU gain), BN weight 1 / bias 0,
        head std 0.02; zero biases. (A small-init projection starves the head of signal early on.)"""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.kaiming_normal_(self.proj.weight, nonlinearity="relu")
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.image_channels:
            raise ValueError(f"images must be [B, {c.image_channels}, H, W], got {list(images.shape)}")
        x = images.to(self.head.weight.device, self.head.weight.dtype)
        if x.shape[-2:] != (c.image_size, c.image_size):
            x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim): the FID feature space."""
        x = self.body(self._prepare(images))  # (B, widths[-1], S / 2^len(widths), same)
        return F.relu(self.proj(x.mean(dim=(2, 3))))  # (B, F)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))  # (B, num_classes)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Class ids (B,) in eval mode, in batches."""
        was_training = self.training
        self.eval()
        out = torch.cat([self(images[i : i + batch_size]).argmax(dim=1).cpu()
                         for i in range(0, images.shape[0], batch_size)])
        self.train(was_training)
        return out

    # Checkpoints ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ClassifierConfig, class_names: Sequence[str] | None = None) -> Classifier:
        model = cls(config, class_names)
        model.init_weights()
        return model

    def save_pretrained(self, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
        meta = {"class_names": json.dumps(self.class_names), **(extra or {})}
        out = save_checkpoint(path, self.state_dict(), kind=KIND, config=self.config.to_dict(), extra=meta)
        self.checkpoint_id, self.checkpoint_sha256 = str(out), file_sha256(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Classifier:
        state, metadata = load_checkpoint(path, device=device)
        try:
            config = ClassifierConfig.from_dict(config_from_metadata(metadata, kind=KIND, path=path))
            names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
            with torch.device("meta"):
                model = cls(config, names)
            model.load_state_dict(state, strict=True, assign=True)
        except (TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: bad classifier checkpoint ({str(e).splitlines()[0]})") from None
        model.checkpoint_id, model.checkpoint_sha256 = str(path), file_sha256(path)
        return model.eval()


# Training -----------------------------------------------------------------------------------------
def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in 0..255 -> float in [-1, 1]; float input passes through."""
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    return images.float()


def augment(images: torch.Tensor, *, max_shift: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flips and shifts of up to `max_shift` pixels (edge padding), per image."""
    B, _, H, W = images.shape
    flip = torch.rand(B, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None].to(images.device), images.flip(-1), images)
    if max_shift <= 0:
        return images
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    steps: int
    final_loss: float
    train_accuracy: float


def train_classifier(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float = 3.0,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    use_augment: bool = True,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Fit `model` on images (N, C, H, W) (uint8 or float in [-1, 1]) and labels (N,) in memory.

    AdamW with a one-cycle schedule (10% linear warmup, cosine decay to 0); `on_step(step, total,
    loss)` is called every step (progress reporting belongs to the caller).
    """
    n = images.shape[0]
    if n == 0 or labels.shape[0] != n:
        raise ValueError(f"need N > 0 images and N labels, got {n} images and {labels.shape[0]} labels")
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= model.config.num_classes:
        raise ValueError(f"labels must be in [0, {model.config.num_classes})")
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    device = model.head.weight.device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, total // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    model.train()
    step, order, pos = 0, torch.randperm(n, generator=generator), 0
    correct = seen = 0
    loss_value = float("nan")
    while step < total:
        if pos >= n:
            order, pos = torch.randperm(n, generator=generator), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x = to_float_images(images[idx])
        if use_augment:
            x = augment(x, generator=generator)
        y = labels[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step >= total - steps_per_epoch:  # running accuracy over (about) the last epoch
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += y.shape[0]
        step += 1
        if on_step is not None:
            on_step(step, total, loss_value)
    recalibrate_batchnorm(model, images, batch_size=batch_size)
    model.eval()
    return TrainResult(steps=total, final_loss=loss_value, train_accuracy=correct / max(1, seen))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, *, batch_size: int = 128, max_images: int = 4096) -> None:
    """Recompute BatchNorm running statistics as exact averages over (up to `max_images`) training
    images with the final weights. The running averages kept during training lag behind weights that
    moved fast, and eval-mode outputs (the judge's verdicts, FID features) use them."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches seen
    model.train()
    device = next(model.parameters()).device
    for i in range(0, min(images.shape[0], max_images), batch_size):
        model(to_float_images(images[i : i + batch_size]).to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def evaluate_classifier(model: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Accuracy of `model` on images (uint8 or float in [-1, 1]) with labels (N,)."""
    predictions = torch.cat([model.predict(to_float_images(images[i : i + batch_size]))
                             for i in range(0, images.shape[0], batch_size)])
    return float((predictions == labels.long().cpu()).double().mean()) if labels.numel() else math.nan
