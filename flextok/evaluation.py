"""Evaluation loops over tensors in memory: reconstruction quality per k, and generator FID/accuracy per k.

Owns: the loops `flextok evaluate` runs once the images are in memory: tokenize -> detokenize every
prefix length k and score (MSE, PSNR, classifier agreement, mean-image baseline); sample per k and
score (Fréchet distance to reference features, class accuracy); feature extraction in batches.
Does not own: reading corpora, checkpoints or reports (jobs), the metrics themselves
(`flextok.metrics`), sampling (`flextok.sampling`).

Seeding: decoder noise for a batch is drawn from a generator seeded by (seed, batch index) and
re-seeded for every k, so all k of one image share the same noise and differences across k come
from the tokens alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flextok.classifier import to_float_images
from flextok.metrics import FeatureStats, frechet_distance_stats, mse_per_image, psnr_from_mse
from flextok.precision import precision_context
from flextok.sampling import sample

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def pow2_ks(max_tokens: int) -> list[int]:
    """1, 2, 4, ... up to K, with K itself last even when it is not a power of two."""
    ks = [2**i for i in range(int(math.log2(max_tokens)) + 1)]
    return ks if ks[-1] == max_tokens else ks + [max_tokens]


def _seeded(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + index) % 2**63)


@torch.no_grad()
def extract_features(network: Any, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """`network.features` over images (uint8 or float in [-1, 1]) in batches -> (N, F) float64 on CPU."""
    device = next(network.parameters()).device
    out = [network.features(to_float_images(images[i : i + batch_size]).to(device)).double().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def predict(classifier: Any, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    device = next(classifier.parameters()).device
    return torch.cat([classifier(to_float_images(images[i : i + batch_size]).to(device)).argmax(1).cpu()
                      for i in range(0, images.shape[0], batch_size)])


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float | None:
    valid = labels >= 0
    if not bool(valid.any()):
        return None
    return float((predictions[valid] == labels[valid]).double().mean())


# Reconstruction -----------------------------------------------------------------------------------
@dataclass
class ReconstructionResult:
    ks: list[int]
    num_images: int
    mse: list[float]
    psnr: list[float]  # mean over images of per-image PSNR (dB)
    psnr_std: list[float]
    mean_image_psnr: float  # baseline: every image predicted by the mean image of the set
    accuracy: list[float | None] = field(default_factory=list)  # classifier agrees with the label, per k
    originals_accuracy: float | None = None
    fid: list[float] = field(default_factory=list)  # reconstructions vs originals, per k (rFID)
    feature_space: str | None = None  # of the FID: "inception" or "classifier"
    grid: torch.Tensor | None = None  # (R, 1 + len(ks), 3, H, W): original then each k

    def per_k(self) -> list[dict[str, Any]]:
        rows = []
        for i, k in enumerate(self.ks):
            row = {"k": k, "mse": self.mse[i], "psnr": self.psnr[i], "psnr_std": self.psnr_std[i]}
            if self.accuracy:
                row["classifier_accuracy"] = self.accuracy[i]
            if self.fid:
                row["fid"] = self.fid[i]
            rows.append(row)
        return rows


@torch.no_grad()
def reconstruction_metrics(
    tokenizer: Any,
    images: torch.Tensor,
    ks: Sequence[int],
    *,
    labels: torch.Tensor | None = None,
    classifier: Any = None,
    steps: int = 25,
    guidance_scale: float = 1.0,
    apg: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    grid_images: int = 8,
    feature_net: Any = None,
    progress: Progress | None = None,
    precision: str = "fp32",
) -> ReconstructionResult:
    """Tokenize `images` (N, 3, S, S) (uint8 or [-1, 1]) once, decode every prefix k, score.

    With a classifier and labels (N,) (-1 = unknown), also the fraction of originals and of
    reconstructions at each k that the classifier assigns to the true label. With a `feature_net`
    (`.features`, `.feature_space`), also the Fréchet distance between the features of the
    reconstructions at each k and of the originals (rFID). Tokenizing and decoding run at
    `precision` (`flextok.precision`): pass the pipeline's to measure the tokens it writes.
    """
    ks = sorted(set(int(k) for k in ks))
    K = tokenizer.config.num_registers
    if not ks or ks[0] < 1 or ks[-1] > K:
        raise ValueError(f"token counts must be in 1..{K}, got {ks}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    device = tokenizer.device
    sq_err = {k: [] for k in ks}
    preds = {k: [] for k in ks}
    feats: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    grid_rows: list[torch.Tensor] = []
    for b, start in enumerate(range(0, n, batch_size)):
        x = to_float_images(images[start : start + batch_size]).to(device)
        with precision_context(precision, device):
            tokens = tokenizer.tokenize(x)  # (B, K)
        keep = max(0, min(grid_images - start, x.shape[0]))
        columns = [x[:keep].cpu()]
        for k in ks:
            with precision_context(precision, device):
                rec = tokenizer.detokenize(tokens[:, :k], steps=steps, guidance_scale=guidance_scale, apg=apg,
                                           generator=_seeded(seed, b, device)).float().clamp(-1, 1)  # measured as an image
            sq_err[k].append(mse_per_image(rec, x).cpu())
            if classifier is not None:
                preds[k].append(predict(classifier, rec))
            if feature_net is not None:
                feats[k].append(extract_features(feature_net, rec, batch_size=batch_size))
            columns.append(rec[:keep].cpu())
        if keep:
            grid_rows.append(torch.stack(columns, dim=1))  # (keep, 1 + len(ks), 3, H, W)
        if progress is not None:
            progress(f"reconstructed {min(start + batch_size, n)}/{n} images at k = {ks}")
    mse = {k: torch.cat(v) for k, v in sq_err.items()}
    psnr = {k: psnr_from_mse(v) for k, v in mse.items()}
    floats = to_float_images(images).double()
    mean_image = floats.mean(dim=0, keepdim=True).expand_as(floats)
    result = ReconstructionResult(
        ks=ks,
        num_images=n,
        mse=[float(mse[k].mean()) for k in ks],
        psnr=[float(psnr[k].mean()) for k in ks],
        psnr_std=[float(psnr[k].std()) if n > 1 else 0.0 for k in ks],
        mean_image_psnr=float(psnr_from_mse(mse_per_image(mean_image, floats)).mean()),
        grid=torch.cat(grid_rows) if grid_rows else None,
    )
    if classifier is not None and labels is not None:
        labels = torch.as_tensor(labels).long().cpu()
        result.originals_accuracy = _accuracy(predict(classifier, images), labels)
        result.accuracy = [_accuracy(torch.cat(preds[k]), labels) for k in ks]
    if feature_net is not None:
        reference = FeatureStats.of(extract_features(feature_net, images, batch_size=batch_size))
        result.fid = [frechet_distance_stats(FeatureStats.of(torch.cat(feats[k])), reference) for k in ks]
        result.feature_space = feature_net.feature_space
    return result


# Generation ---------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    ks: list[int]
    num_samples: int
    feature_space: str
    fid: list[float]
    accuracy: list[float | None]
    reference_floor_fid: float | None = None  # see `reference_floor_fid`
    grid: torch.Tensor | None = None  # (R, len(ks), 3, H, W): one sample per condition and k
    mean_tokens: list[float] = field(default_factory=list)  # per k: tokens per sample (< k where EOS ends it)
    length_histograms: list[dict[int, int]] = field(default_factory=list)  # per k: samples per length

    def per_k(self) -> list[dict[str, Any]]:
        return [{"k": k, "fid": f, "class_accuracy": a, "mean_tokens": m}
                for k, f, a, m in zip(self.ks, self.fid, self.accuracy, self.mean_tokens)]


def reference_floor_fid(features: torch.Tensor, num_samples: int, seed: int = 0) -> float | None:
    """FID of min(num_samples, N/2) random reference images against the other reference images: what
    a generator whose samples were real held-out images would score with that many samples (FID is
    biased upwards at small sample sizes). None below 4 reference images."""
    n = features.shape[0]
    if n < 4:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    m = max(2, min(num_samples, n // 2))
    return frechet_distance_stats(FeatureStats.of(features[order[:m]]), FeatureStats.of(features[order[m:]]))


@torch.no_grad()
def generation_metrics(
    generator: Any,
    tokenizer: Any,
    conditions: Sequence[int] | Sequence[str],
    ks: Sequence[int],
    *,
    reference: FeatureStats,
    feature_net: Any,
    targets: torch.Tensor | None = None,
    classifier: Any = None,
    grid_conditions: Sequence[int] = (),
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
    **sampling: Any,
) -> GenerationResult:
    """For each k: one sample per condition, FID of the samples' features against `reference`, and
    the fraction the classifier assigns to `targets` (N,) (-1 = no target).

    `grid_conditions` are indices into `conditions` whose k-samples form the grid rows; `sampling`
    goes to `flextok.sampling.sample` (temperature, top_k, top_p, cfg_scale, decoder_steps, ...).
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > generator.max_tokens:
        raise ValueError(f"token counts must be in 1..{generator.max_tokens}, got {ks}")
    device = next(generator.parameters()).device
    fids, accs, columns, means, histograms = [], [], [], [], []
    for i, k in enumerate(ks):
        tokens, images = sample(
            generator, tokenizer, conditions, num_tokens=k, batch_size=batch_size,
            rng=_seeded(seed, i, device), **sampling,
        )
        lengths = (tokens >= 0).sum(dim=1)  # an EOS generator pads after its end with negative ids
        means.append(float(lengths.float().mean()))
        histograms.append({int(n): int(c) for n, c in zip(*lengths.unique(return_counts=True))})
        stats = FeatureStats.of(extract_features(feature_net, images, batch_size=batch_size))
        fids.append(frechet_distance_stats(stats, reference))
        if classifier is not None and targets is not None:
            accs.append(_accuracy(predict(classifier, images), torch.as_tensor(targets).long().cpu()))
        else:
            accs.append(None)
        if grid_conditions:
            columns.append(images[list(grid_conditions)])
        if progress is not None:
            acc = f", class accuracy {accs[-1]:.3f}" if accs[-1] is not None else ""
            progress(f"k={k}: {len(conditions)} samples of {means[-1]:.1f} tokens on average, FID {fids[-1]:.2f}{acc}")
    grid = torch.stack(columns, dim=1) if columns else None  # (R, len(ks), 3, H, W)
    return GenerationResult(ks=ks, num_samples=len(conditions), feature_space=feature_net.feature_space,
                            fid=fids, accuracy=accs, grid=grid, mean_tokens=means, length_histograms=histograms)
