"""Evaluation metrics on cases with known answers; the classifier and Inception feature networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextok.checkpoint import CheckpointError
from flextok.metrics import (
    FeatureStats,
    accuracy,
    frechet_distance,
    frechet_distance_features,
    mse_per_image,
    psnr_from_mse,
    psnr_per_image,
    trace_sqrt_product,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q


def _closed_form_commuting(mu1, var1, mu2, var2) -> float:
    """Fréchet distance of N(mu1, Q diag(var1) Qᵀ) and N(mu2, Q diag(var2) Qᵀ): commuting covariances."""
    return float(((mu1 - mu2) ** 2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum())


# PSNR / MSE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("delta", [0.02, 0.1, 0.5, 1.0])
def test_psnr_of_a_constant_offset_is_closed_form(delta):
    images = torch.rand(4, 3, 16, 16, generator=_gen()) * 2 - 1
    psnr = psnr_per_image(images + delta, images)
    expected = 10 * math.log10(4 / delta**2)
    assert torch.allclose(psnr, torch.full((4,), expected, dtype=torch.float64), atol=1e-4)


def test_psnr_of_uniform_noise_matches_its_variance():
    # U(-a, a) has variance a²/3: PSNR = 10 log10(4 / (a²/3)) for [-1, 1] images.
    a = 0.2
    images = torch.zeros(8, 3, 64, 64)
    noise = (torch.rand(images.shape, generator=_gen(1)) * 2 - 1) * a
    psnr = psnr_per_image(images + noise, images)
    expected = 10 * math.log10(4 / (a**2 / 3))
    assert abs(float(psnr.mean()) - expected) < 0.1
    assert float(psnr.mean()) == pytest.approx(float(psnr_from_mse(mse_per_image(images + noise, images)).mean()))


def test_psnr_of_identical_images_is_infinite_and_mse_zero():
    images = torch.rand(2, 3, 8, 8)
    assert torch.all(mse_per_image(images, images) == 0)
    assert torch.all(torch.isinf(psnr_per_image(images, images)))


def test_mse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        mse_per_image(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 4))


# Feature statistics -------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.floats(-1e6, 1e6))
def test_streamed_stats_equal_one_shot_even_with_large_means(sizes, offset):
    features = torch.randn(sum(sizes), 5, generator=_gen(2), dtype=torch.float64) + offset
    stats = FeatureStats(5)
    for chunk in features.split(sizes):
        stats.update(chunk)
    assert stats.count == features.shape[0]
    assert torch.allclose(stats.mean, features.mean(0), rtol=1e-12, atol=1e-9 * (1 + abs(offset)))
    if features.shape[0] >= 2:
        assert torch.allclose(stats.covariance, torch.cov(features.T - offset), atol=1e-6)


def test_stats_need_two_samples_for_a_covariance():
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats.of(torch.zeros(1, 3)).covariance


# Fréchet distance ---------------------------------------------------------------------------------
def test_identical_feature_sets_have_zero_fid():
    features = torch.randn(400, 32, generator=_gen(3))
    assert frechet_distance_features(features, features) == pytest.approx(0.0, abs=1e-8)


def test_identical_sets_with_fewer_samples_than_dims_still_zero():
    # Singular covariances (N < D): sqrtm-based code needs an eps hack here; eigh does not.
    features = torch.randn(10, 64, generator=_gen(4))
    value = frechet_distance_features(features, features)
    assert math.isfinite(value) and value == pytest.approx(0.0, abs=1e-8)


def test_shifted_set_has_fid_equal_to_squared_shift():
    features = torch.randn(300, 8, generator=_gen(5), dtype=torch.float64)
    shift = torch.linspace(0.1, 0.8, 8, dtype=torch.float64)
    value = frechet_distance_features(features, features + shift)
    assert value > 1.0
    assert value == pytest.approx(float((shift.double() ** 2).sum()), rel=1e-9)


def test_frechet_matches_closed_form_for_gaussians_with_commuting_covariances():
    d = 6
    q = _random_rotation(d, 6)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.linspace(-1, 1, d, dtype=torch.float64)
    var1 = torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    var2 = torch.linspace(2.0, 0.1, d, dtype=torch.float64)
    cov1, cov2 = q @ torch.diag(var1) @ q.T, q @ torch.diag(var2) @ q.T
    expected = _closed_form_commuting(mu1, var1, mu2, var2)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-10)


def test_frechet_of_samples_approaches_the_closed_form():
    d, n = 4, 40_000
    q = _random_rotation(d, 7)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    var1 = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    var2 = torch.tensor([0.3, 2.5, 1.0, 1.0], dtype=torch.float64)
    g = _gen(8)
    x1 = mu1 + (torch.randn(n, d, generator=g, dtype=torch.float64) * var1.sqrt()) @ q.T
    x2 = mu2 + (torch.randn(n, d, generator=g, dtype=torch.float64) * var2.sqrt()) @ q.T
    expected = _closed_form_commuting(mu1, var1, mu2, var2)
    assert frechet_distance_features(x1, x2) == pytest.approx(expected, rel=0.05)


def test_trace_sqrt_product_matches_scipy_sqrtm_on_general_spd_matrices():
    import scipy.linalg as scipy_linalg  # scikit-learn's dependency: installed with the dev extras
    g = _gen(9)
    for d in (3, 10, 40):
        a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
        b = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
        cov1, cov2 = a @ a.T / d, b @ b.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
        reference = np.trace(scipy_linalg.sqrtm(cov1.numpy() @ cov2.numpy())).real
        assert float(trace_sqrt_product(cov1, cov2)) == pytest.approx(reference, rel=1e-8)


def test_frechet_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_accuracy_from_logits_and_ids():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1]), 3).float()
    assert accuracy(logits, labels) == 0.75
    assert accuracy(torch.tensor([0, 1, 2, 1]), labels) == 1.0


# Inception-v3 feature extractor ------------------------------------------------------------------
def test_inception_refuses_pickles_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    from flextok.inception import InceptionV3Features

    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    pth.write_bytes(b"PK\x03\x04 torch zip archive")
    with pytest.raises(CheckpointError, match="nothing is unpickled"):
        InceptionV3Features.from_safetensors(pth)
    foreign = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(CheckpointError, match="missing"):
        InceptionV3Features.from_safetensors(foreign)


@pytest.mark.slow
def test_inception_loads_a_converted_state_dict_and_gives_2048_features(tmp_path):
    from safetensors.torch import save_file

    from flextok.inception import InceptionV3Features

    torch.manual_seed(0)
    model = InceptionV3Features().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, as in trained weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = dict(model.state_dict())
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # present in some conversions; ignored
    path = tmp_path / "inception.safetensors"
    save_file(state, str(path))
    loaded = InceptionV3Features.from_safetensors(path)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected, got = model.features(images), loaded.features(images)
    assert got.shape == (2, 2048)
    assert torch.allclose(got, expected, atol=1e-5)
    assert loaded.checkpoint_sha256 is not None and not any(p.requires_grad for p in loaded.parameters())
