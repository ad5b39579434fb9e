"""Every enforcing method is checked against an exact SVD on tall, wide, batched, fp32 and bf16 inputs."""

import pytest
import torch

from lipcli.constraints import METHODS, CapContext, get_method, project, softcap_strength
from lipcli.spectral import rms_norm_exact, rms_scale

SHAPES = [(48, 48), (96, 24), (24, 96), (3, 32, 16)]


def _with_spectrum(shape: tuple[int, ...], spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A matrix with the given RMS->RMS singular values (descending) and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    u, _, vh = torch.linalg.svd(torch.randn(shape, generator=gen, dtype=torch.float64), full_matrices=False)
    w = u * spectrum.to(torch.float64).unsqueeze(-2) @ vh
    return (w * rms_scale(w)).float()


def _rms_singular_values(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double()) / rms_scale(w)


def _spectra(k: int) -> dict[str, torch.Tensor]:
    spread = torch.logspace(0, -3, k)
    deficient = spread.clone()
    deficient[k // 2 :] = 0.0
    return {"spread": spread, "flat": torch.ones(k), "rank_deficient": deficient}


@pytest.mark.parametrize("method", ["svd", "hardcap", "normalize", "softcap"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.3, 1.0, 1.7, 50.0])
def test_enforcing_methods_cap_every_singular_value(method, shape, scale):
    k = min(shape[-2:])
    for name, spectrum in _spectra(k).items():
        w = _with_spectrum(shape, spectrum * scale)
        out = project(w, method, CapContext(sigma_max=2.0))
        s = _rms_singular_values(out)
        assert float(s.max()) <= 2.0 * (1 + 1e-3), (method, name, float(s.max()))
        if scale * 1.0 <= 2.0 and method != "softcap":
            # Already inside the cap: an exact projection leaves it alone.
            torch.testing.assert_close(out, w, atol=2e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("method", ["svd", "hardcap", "softcap", "normalize"])
@pytest.mark.parametrize("shape", SHAPES)
def test_methods_preserve_singular_vectors(method, shape):
    k = min(shape[-2:])
    w = _with_spectrum(shape, torch.linspace(3.0, 0.1, k), seed=1).double()
    out = project(w, method, CapContext(sigma_max=1.0)).double()
    # Spectral functions commute with the SVD: U^T out V is diagonal.
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    core = u.mT @ out @ vh.mT
    off = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
    assert float(off.abs().max()) < 1e-4 * float(core.abs().max())
    # ... and monotone: the order of singular values is kept.
    d = torch.diagonal(core, dim1=-2, dim2=-1)
    assert bool((d[..., :-1] >= d[..., 1:] - 1e-5).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_hardcap_matches_svd_clip(shape):
    k = min(shape[-2:])
    w = _with_spectrum(shape, torch.logspace(1, -2, k), seed=2)
    hard = project(w, "hardcap", CapContext(sigma_max=1.0))
    exact = project(w, "svd", CapContext(sigma_max=1.0))
    torch.testing.assert_close(hard, exact, atol=5e-4, rtol=0)


@pytest.mark.parametrize("ratio", [1.0, 1.05, 1.2, 1.3])
def test_softcap_coupling_maps_the_bound_onto_sigma_max(ratio):
    """With all singular values <= k = ratio * sigma_max, the cap lands the largest exactly on sigma_max."""
    sigma_max = 1.5
    k = sigma_max * ratio
    shape = (40, 40)
    w = _with_spectrum(shape, torch.linspace(k, 0.0, 40), seed=3)
    out = project(w, "softcap", CapContext(sigma_max=sigma_max, norm_bound=k))
    s = _rms_singular_values(out)
    assert float(s.max()) == pytest.approx(sigma_max, rel=1e-5)
    assert float(s.max()) <= sigma_max * (1 + 1e-5)
    alpha = softcap_strength(k, sigma_max)
    assert alpha >= 0.0 and (alpha == 0.0) == (ratio == 1.0)


def test_softcap_strength_solves_the_papers_quartic():
    k, w_max = 1.13, 1.0
    a = softcap_strength(k, w_max)
    quartic = -(k**9) * a**4 + 3 * k**7 * a**3 - 3 * k**5 * a**2 + (k - w_max)
    assert abs(quartic) < 1e-12
    assert a * k**2 <= 1 / 3


@pytest.mark.parametrize("method", ["svd", "hardcap", "softcap", "normalize"])
def test_bf16_weights_stay_bf16_and_capped(method):
    w = _with_spectrum((64, 32), torch.linspace(4.0, 0.5, 32), seed=4).bfloat16()
    out = project(w, method, CapContext(sigma_max=1.0))
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: rounding each entry moves sigma by at most ~2^-8 relative.
    assert float(rms_norm_exact(out)) <= 1.0 * (1 + 2**-7)


def test_hammer_sets_only_the_top_singular_value():
    spectrum = torch.tensor([5.0, 3.0, 1.0, 0.5])
    w = _with_spectrum((4, 4), spectrum, seed=5)
    out = project(w, "hammer", CapContext(sigma_max=2.0))
    s = _rms_singular_values(out)
    # Documented non-guarantee: the second singular value (3) stays above the target.
    torch.testing.assert_close(
        s.sort(descending=True).values, torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64), atol=1e-3, rtol=0
    )


def test_spectral_weight_decay_shrinks_the_top_value():
    spectrum = torch.tensor([4.0, 2.0, 1.0])
    w = _with_spectrum((3, 3), spectrum, seed=6)
    out = project(w, "spec-wd", CapContext(sigma_max=1.0, decay=0.25))
    torch.testing.assert_close(
        _rms_singular_values(out), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), atol=1e-3, rtol=0
    )


def test_none_and_wd_leave_weights_alone():
    w = torch.randn(8, 8) * 10
    for method in ("none", "wd"):
        assert torch.equal(project(w, method, CapContext(sigma_max=1.0)), w)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="softcap"):
        get_method("clip")
    assert set(METHODS) == {"none", "wd", "spec-wd", "normalize", "hammer", "softcap", "hardcap", "svd"}
