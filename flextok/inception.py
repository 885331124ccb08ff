"""Inception-v3 as the FID feature extractor (2048-d pool3 features), from a local safetensors file.

Owns: the Inception-v3 network in the variant FID implementations use (the TF 2015-12-05 graph as
ported by pytorch-fid: average pools that do not count padding, max pooling in the last block's
pool branch, BatchNorm eps 1e-3), the 299x299 bilinear resize, and loading weights. Parameter names
follow the usual PyTorch layout (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`,
…, `fc.weight`), which is the layout of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.
Does not own: the Fréchet distance (`flextok.metrics`).

Weights never ship with the project and nothing is downloaded: the caller passes a local file.
Those public weights are `.pth` pickles, and nothing is ever unpickled here, so they must first be
converted to safetensors by the user (`save_file(torch.load(pth, weights_only=True), out)`).
`AuxLogits.*` and `num_batches_tracked` entries are ignored if present; anything else missing or
extra is an error naming the keys.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flextok.checkpoint import CheckpointError, file_sha256, load_checkpoint

FEATURE_DIM = 2048
INPUT_SIZE = 299
FEATURE_SPACE = "inception-v3-pool3"


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; children `conv` and `bn`."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # The TF graph averages over the valid (unpadded) pixels only.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool(x))
        return torch.cat([a, b, c, d], dim=1)


class BlockB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg_pool(x))
        return torch.cat([a, b, c, d], dim=1)


class BlockD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `max_pool` selects the last block's pool branch."""

    def __init__(self, c_in: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], dim=1)


class InceptionV3Features(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> pool3 features (B, 2048) for FID."""

    feature_dim = FEATURE_DIM
    feature_space = FEATURE_SPACE

    def __init__(self, num_logits: int = 1008) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        # The classifier head is part of the public weight files; FID does not use it.
        self.fc = nn.Linear(FEATURE_DIM, num_logits)
        self.checkpoint_id = "unsaved"
        self.checkpoint_sha256: str | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.fc.weight.dtype)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # (B, 2048)

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> InceptionV3Features:
        """Load FID Inception weights from a local safetensors file (a conversion of the `.pth`)."""
        p = Path(path)
        if p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            raise CheckpointError(
                f"{p} is a pickle-based weight file; nothing is unpickled here: convert it to safetensors "
                "first (safetensors.torch.save_file(torch.load(pth, weights_only=True), 'inception.safetensors'))"
            )
        state, _ = load_checkpoint(p, device=device)
        state = {k: v for k, v in state.items()
                 if not k.startswith("AuxLogits.") and not k.endswith("num_batches_tracked")}
        fc = state.get("fc.weight")
        with torch.device("meta"):
            model = cls(num_logits=int(fc.shape[0]) if fc is not None else 1008)
        own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        wrong = sorted(k for k in own & set(state) if tuple(state[k].shape) != tuple(model.state_dict()[k].shape))
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{p} does not hold FID Inception-v3 weights in the PyTorch layout: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}, wrong shape {wrong[:4]} ({len(missing)}/{len(unexpected)}/{len(wrong)})"
            )
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
        for module in model.modules():  # buffers load_state_dict skipped stay on meta otherwise
            if isinstance(module, nn.BatchNorm2d):
                module.num_batches_tracked = torch.zeros((), dtype=torch.long, device=device)
        model.checkpoint_id, model.checkpoint_sha256 = str(p), file_sha256(p)
        return model.eval().requires_grad_(False)
