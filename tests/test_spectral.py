import math

import pytest
import torch

from lipcli.spectral import (
    MUON_COEFFS,
    _proved_top_eigenvalue_bound,
    certified_product_bound,
    certified_spectral_bound,
    max_gain,
    msign,
    power_iteration,
    rms_norm_exact,
    rms_scale,
)


def _random(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(40, 40), (64, 16), (16, 64), (3, 24, 12)])
def test_rms_norm_is_scaled_spectral_norm(shape):
    w = _random(shape)
    sigma = torch.linalg.svdvals(w.double())[..., 0]
    expected = sigma * math.sqrt(shape[-1] / shape[-2])
    torch.testing.assert_close(rms_norm_exact(w), expected)
    assert rms_scale(w) == pytest.approx(math.sqrt(shape[-2] / shape[-1]))


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96), (2, 40, 20)])
def test_msign_polished_is_polar_factor(shape):
    w = _random(shape, 1)
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    polar = msign(w.double(), MUON_COEFFS * 2, polish=6)
    torch.testing.assert_close(polar, u @ vh, atol=1e-6, rtol=0)


def test_msign_muon_keeps_singular_vectors_and_bounded_gain():
    w = _random((64, 32), 2)
    o = msign(w)
    s = torch.linalg.svdvals(o.double())
    assert float(s.max()) <= max_gain(MUON_COEFFS) + 1e-4
    assert float(s.min()) > 0.5
    # The same left singular subspace: o = U f(S) V^T.
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    core = u.mT @ o.double() @ vh.mT
    off_diagonal = core - torch.diag_embed(torch.diagonal(core))
    assert float(off_diagonal.abs().max()) < 1e-3


@pytest.mark.parametrize("scale", [1e-24, 1e-30, 0.0])
def test_msign_of_a_vanishing_update_stays_finite_and_bounded(scale):
    # A saturated attention head's q/k momentum decays to ~1e-22: float32 squares of its entries underflow.
    w = _random((1, 64, 256), 5) * scale
    o = msign(w)
    assert bool(torch.isfinite(o).all())
    assert float(torch.linalg.matrix_norm(o.double(), ord=2).max()) <= max_gain(MUON_COEFFS) + 1e-4


def test_muon_gain_matches_measured_inflation():
    # ECOSYSTEM.md: the default quintic inflates a singular value to about 1.2024.
    assert max_gain(MUON_COEFFS) == pytest.approx(1.2024, abs=2e-4)


def test_msign_bf16_input_returns_bf16():
    w = _random((32, 32), 3).bfloat16()
    assert msign(w).dtype == torch.bfloat16


def test_power_iteration_underestimates_and_converges():
    w = _random((50, 30), 4)
    sigma_exact = float(torch.linalg.svdvals(w.double())[0])
    sigma, u, v = power_iteration(w, iters=200)
    assert float(sigma) <= sigma_exact * (1 + 1e-6)
    assert float(sigma) == pytest.approx(sigma_exact, rel=1e-4)
    torch.testing.assert_close(w @ v, sigma * u, atol=1e-3, rtol=0)


def _with_spectrum(rows: int, cols: int, singular_values: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=gen, dtype=torch.float64)).Q
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(60, 60), (120, 40), (40, 120), (3, 50, 30)])
@pytest.mark.parametrize("iters", [1, 4, 16])
def test_certified_bound_is_never_below_the_exact_norm_and_close_to_it(shape, dtype, iters):
    w = (_random(shape, 5) * 7).to(dtype)
    sigma = torch.linalg.svdvals(w.double())[..., 0]
    bound = certified_spectral_bound(w, iters=iters)
    assert bound.shape == sigma.shape
    assert bool((bound >= sigma).all())
    # Every candidate is at most 10% above its estimate, and a missed estimate falls back to the exact one.
    assert bool((bound <= sigma * 1.1**0.5 * (1 + 1e-9)).all())
    if iters == 16:
        assert bool((bound <= sigma * (1 + 1e-3)).all())


def test_certified_bound_is_tight_on_flat_spectra():
    # Muon and the caps leave many singular values at the cap: power iteration's estimate is exact there.
    w = _with_spectrum(256, 128, [1.0] * 100 + [0.5] * 28)
    bound = float(certified_spectral_bound(w, iters=2))
    assert 1.0 <= bound <= 1.0 + 1e-6


def test_an_unconverged_estimate_falls_back_to_the_exact_eigenvalue():
    # The fixed power-iteration start is the second right singular vector: every iterate stays there.
    start = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis = torch.linalg.qr(torch.cat([start[:, None], _random((50, 49), 2).double()], dim=1)).Q
    right = torch.cat([basis[:, 1:2], basis[:, :1], basis[:, 2:]], dim=1)
    left = torch.linalg.qr(_random((80, 50), 3).double()).Q
    w = left @ torch.diag(torch.tensor([1.0, 0.5] + [0.1] * 48, dtype=torch.float64)) @ right.T
    estimate, _, _ = power_iteration(w, start, iters=8)
    assert float(estimate) == pytest.approx(0.5, rel=1e-3)  # power iteration alone is far off: the fallback decides
    bound = float(certified_spectral_bound(w, iters=8))
    assert 1.0 <= bound <= 1.0 + 1e-6


@pytest.mark.parametrize("iters", [4, None])
@pytest.mark.parametrize("scale", [0.0, 1e-120, 1e120, 1e300])
def test_certified_bound_on_zero_tiny_and_huge_matrices(scale, iters):
    """Scale-invariant: the matrix is rescaled by a power of two first, so a Gram of 1e600 never overflows."""
    w = _random((30, 20), 6).double()
    sigma = float(torch.linalg.svdvals(w)[0]) * scale
    bound = float(certified_spectral_bound(w * scale, iters=iters))
    assert sigma <= bound <= float(certified_spectral_bound(w, iters=iters)) * scale * (1 + 1e-9)
    if iters is None:  # eigvalsh's estimate: proved within a few 1e-12
        assert bound <= sigma * (1 + 1e-10)


def test_cholesky_never_proves_a_value_below_the_top_eigenvalue():
    w = _with_spectrum(100, 100, [1.0, 1.0 - 1e-9] + [0.3] * 98)
    gram = w.T @ w
    top = float(torch.linalg.eigvalsh(gram)[-1])
    for relative in (-1e-2, -1e-6, -1e-10, -1e-13, 0.0, 1e-13, 1e-10, 1e-6):
        proved = _proved_top_eigenvalue_bound(gram.clone(), top * (1 + relative))
        assert proved is None or proved >= top
        if relative <= -1e-10:
            assert proved is None
        if relative >= 1e-10:
            assert proved is not None


def test_certified_bound_rejects_non_finite_weights():
    w = _random((10, 10))
    w[3, 4] = float("nan")
    with pytest.raises(ArithmeticError):
        certified_spectral_bound(w)


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_product_bound_through_qr_is_proved_and_tight(scale):
    """sigma(O_h V_h) via O_h's QR factor, with the QR's and the product's rounding accounted for (40-digit check)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    left = _random((3, 12, 4), 7).double() * scale  # [heads, d, d_h], like O_h
    right = _random((3, 4, 12), 8).double()  # [heads, d_h, d], like V_h
    bound = certified_product_bound(left, right, certified_spectral_bound(right, iters=None), _exact_sigma)
    for h in range(3):
        product = mpmath.matrix(left[h].tolist()) * mpmath.matrix(right[h].tolist())
        sigma = max(mpmath.svd_r(product, compute_uv=False))
        assert mpmath.mpf(float(bound[h])) >= sigma
        assert mpmath.mpf(float(bound[h])) <= sigma * (1 + mpmath.mpf(1e-9))


def _exact_sigma(w: torch.Tensor) -> torch.Tensor:
    return certified_spectral_bound(w, iters=None)
