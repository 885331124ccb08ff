"""Evaluation metrics: reconstruction error (MSE, PSNR) and the Fréchet distance between feature sets.

Owns: per-image MSE and PSNR of images in [-1, 1]; `FeatureStats`, a streaming mean/covariance in
float64; the Fréchet distance between two Gaussians (FID when the features are Inception-v3 pool3
activations). Does not own: the feature networks (`flextok.inception`, `flextok.classifier`) nor
reading images.

Fréchet distance: d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}). The last term is
computed without `scipy.linalg.sqrtm`: S1 S2 is not symmetric, and sqrtm on it returns complex
values with rounding-noise imaginary parts and fails on the singular covariances that fewer samples
than feature dimensions give (pytorch-fid adds an eps to the diagonal for that). Instead: with
A = S1^{1/2} (PSD square root) and B = A S2, S1 S2 = AB and BA = S1^{1/2} S2 S1^{1/2} =: M, and AB
and BA have the same nonzero eigenvalues; M is symmetric PSD, so those eigenvalues are real and
non-negative and tr((S1 S2)^{1/2}) = Σ sqrt(λ_i(M)), singular covariances included. Only symmetric
eigendecompositions (`eigh`, backward stable) are needed; the tiny negative eigenvalues rounding
produces are clamped to zero. Everything runs in float64.
"""

from __future__ import annotations

import math

import torch

DATA_RANGE = 2.0  # images live in [-1, 1]


# Reconstruction error -----------------------------------------------------------------------------
def mse_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image against its reference: (B, ...) x (B, ...) -> (B,) float64."""
    if images.shape != reference.shape:
        raise ValueError(f"image shapes differ: {list(images.shape)} vs {list(reference.shape)}")
    if images.dim() < 2:
        raise ValueError(f"need a batch of images (B, ...), got shape {list(images.shape)}")
    diff = images.double() - reference.double().to(images.device)
    return diff.pow(2).flatten(1).mean(dim=1)


def psnr_from_mse(mse: torch.Tensor | float, data_range: float = DATA_RANGE) -> torch.Tensor:
    """PSNR in dB = 10 log10(range² / MSE); +inf where the MSE is 0."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """PSNR (dB) of each image against its reference, for images in [-1, 1] (range 2): (B,)."""
    return psnr_from_mse(mse_per_image(images, reference), data_range)


# Feature statistics -------------------------------------------------------------------------------
class FeatureStats:
    """Running mean and covariance of feature vectors (float64), merged batch by batch.

    Batches are merged with Chan et al.'s pairwise update (means and centred second moments), which
    does not lose precision to cancellation the way Σx xᵀ/n - mu muᵀ does when features have large
    means.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"feature dim must be >= 1, got {dim}")
        self.dim = dim
        self.count = 0
        self._mean = torch.zeros(dim, dtype=torch.float64)
        self._m2 = torch.zeros(dim, dim, dtype=torch.float64)  # Σ (x - mean)(x - mean)ᵀ

    def update(self, features: torch.Tensor) -> FeatureStats:
        """Add a batch of features (B, D)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (B, {self.dim}), got {list(features.shape)}")
        x = features.detach().to("cpu", torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return self
        mean_b = x.mean(dim=0)
        centred = x - mean_b
        m2_b = centred.T @ centred  # (D, D)
        n = self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (self.count * n_b / n)
        self.count = n
        return self

    @property
    def mean(self) -> torch.Tensor:
        return self._mean.clone()

    @property
    def covariance(self) -> torch.Tensor:
        """Unbiased sample covariance (D, D); needs at least 2 samples."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        return self._m2 / (self.count - 1)

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        return cls(features.shape[-1]).update(features)


# Fréchet distance ---------------------------------------------------------------------------------
def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root via eigh; eigenvalues below zero (rounding) are clamped."""
    sym = (matrix + matrix.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def trace_sqrt_product(cov1: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """tr((cov1 cov2)^{1/2}) for PSD matrices, as Σ sqrt(eig(cov1^{1/2} cov2 cov1^{1/2}))."""
    root1 = _psd_sqrt(cov1.double())
    middle = root1 @ cov2.double() @ root1
    values = torch.linalg.eigvalsh((middle + middle.T) / 2)
    return values.clamp(min=0).sqrt().sum()


def frechet_distance(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2, cov1, cov2 = (t.detach().to("cpu", torch.float64) for t in (mu1, mu2, cov1, cov2))
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"need means (D,) and covariances (D, D) of one D, got {list(mu1.shape)}, {list(cov1.shape)}, "
            f"{list(mu2.shape)}, {list(cov2.shape)}"
        )
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt_product(cov1, cov2)
    # Rounding can leave a tiny negative value for identical distributions.
    return max(float(value), 0.0)


def frechet_distance_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (FID on Inception features)."""
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance_stats(FeatureStats.of(a), FeatureStats.of(b))


def accuracy(logits_or_predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose prediction (argmax of (B, C) logits, or (B,) ids) equals the label."""
    predictions = logits_or_predictions
    if predictions.dim() == 2:
        predictions = predictions.argmax(dim=1)
    labels = torch.as_tensor(labels, device=predictions.device).long().reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape[0]} predictions but {labels.shape[0]} labels")
    if labels.numel() == 0:
        return math.nan
    return float((predictions.long() == labels).double().mean())
