import math

import pytest
import torch

from lipcli.spectral import MUON_COEFFS, gram_upper_bound, max_gain, msign, power_iteration, rms_norm_exact, rms_scale


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


@pytest.mark.parametrize("iters", [2, 4, 8])
def test_gram_bound_is_sound_and_tightens(iters):
    w = _random((80, 40), 5) * 1e3
    sigma = torch.linalg.svdvals(w.double())[0]
    bound = gram_upper_bound(w, iters=iters)
    assert float(bound) >= float(sigma) * (1 - 1e-12)
    assert float(bound) <= float(sigma) * 40 ** (1 / 2 ** (iters + 1)) * (1 + 1e-9)
