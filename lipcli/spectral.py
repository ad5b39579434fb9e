"""Matrix primitives on weight tensors of shape [..., fan_out, fan_in].

Every norm in lipcli is the RMS->RMS operator norm ``sqrt(fan_in / fan_out) * sigma_1(W)`` (the
paper's w_max convention). :func:`rms_scale` is the only place that factor is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

# Keller Jordan's quintic, also torch.optim.Muon's default: fast, but lands singular values in ~[0.7, 1.2].
MUON_COEFFS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),) * 5
# The cubic Newton-Schulz step x -> 1.5x - 0.5x^3 converges to 1 from below on (0, sqrt 3): exact polish.
CUBIC_POLISH = (1.5, -0.5, 0.0)


def rms_scale(weight: Tensor) -> float:
    """sqrt(fan_out / fan_in): a matrix with spectral norm ``rms_scale`` has RMS->RMS norm 1."""
    fan_out, fan_in = weight.shape[-2], weight.shape[-1]
    return math.sqrt(fan_out / fan_in)


def spectral_norm_exact(weight: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """sigma_1 per matrix, computed in ``dtype`` as sqrt(largest eigenvalue of the smaller Gram).

    Several times faster than an SVD on tall or wide matrices (a 50k-token embedding, a 768x3072
    MLP weight), and exact to the dtype's rounding.
    """
    w = weight.detach().to(dtype)
    gram = w.mT @ w if w.shape[-2] >= w.shape[-1] else w @ w.mT
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).sqrt()


def rms_norm_exact(weight: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Exact RMS->RMS operator norm (per matrix for batched input), computed in ``dtype``."""
    return spectral_norm_exact(weight, dtype) / rms_scale(weight)


def _polynomial_steps(x: Tensor, coeffs: tuple[tuple[float, float, float], ...]) -> Tensor:
    for a, b, c in coeffs:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def msign(x: Tensor, coeffs: tuple[tuple[float, float, float], ...] = MUON_COEFFS, polish: int = 0) -> Tensor:
    """Approximate U V^T (the orthogonal polar factor) by odd Newton-Schulz polynomials.

    Runs on the smaller Gram side, in float32 on CPU and bfloat16 on CUDA for speed unless the
    input is float64. ``polish`` cubic steps drive every non-negligible singular value to 1 from below.
    """
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.is_cuda and compute_dtype == torch.float32 and polish == 0:
        compute_dtype = torch.bfloat16
    y = x.to(compute_dtype)
    transposed = y.shape[-2] > y.shape[-1]
    if transposed:
        y = y.mT
    # The Frobenius norm bounds sigma_1, so every singular value starts in [0, 1]. Dividing by the largest entry
    # first keeps the squares from underflowing (a vanishing momentum, e.g. a saturated head's q/k): an
    # underestimated norm starts singular values above 1, where the polynomial diverges to NaN.
    y = y / y.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    y = y / (torch.linalg.matrix_norm(y, keepdim=True) + 1e-30)
    y = _polynomial_steps(y, coeffs + (CUBIC_POLISH,) * polish)
    if transposed:
        y = y.mT
    return y.to(x.dtype)


@cache
def max_gain(coeffs: tuple[tuple[float, float, float], ...]) -> float:
    """Largest value the iterated scalar polynomial reaches on [0, 1]: the update-norm inflation of msign."""
    s = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)
    for a, b, c in coeffs:
        s = a * s + b * s**3 + c * s**5
    return float(s.abs().max())


def power_iteration(weight: Tensor, v: Tensor | None = None, iters: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triple (sigma, u, v) of ``weight`` [..., m, n] by power iteration from warm start ``v``.

    Under-estimates sigma_1 (it is a Rayleigh quotient): fine for training-time projections,
    never for a certificate.
    """
    w = weight.detach().float()
    if v is None:
        # A fixed pseudo-random start: an all-ones vector can be orthogonal to the top singular vector.
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(*w.shape[:-2], w.shape[-1], generator=gen).to(w.device)
    v = F.normalize(v.to(w), dim=-1)
    for _ in range(iters):
        u = F.normalize((w @ v.unsqueeze(-1)).squeeze(-1), dim=-1)
        v = F.normalize((w.mT @ u.unsqueeze(-1)).squeeze(-1), dim=-1)
    wv = (w @ v.unsqueeze(-1)).squeeze(-1)
    sigma = wv.norm(dim=-1)
    return sigma, F.normalize(wv, dim=-1), v


# Unit roundoff of float64, for the rounding slack that makes the certified bound hold in floating point.
_U64 = 2.0**-53
# Candidate gaps above power iteration's estimate, tightest first: each costs one Cholesky (n^3/3 flops).
_CANDIDATE_GAPS = (1e-9, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
# eigvalsh's lambda_max is off by a few ulps at most (times n): far smaller gaps usually pass first.
_EXACT_GAPS = (1e-12, 1e-10) + _CANDIDATE_GAPS


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float64 dot product."""
    return n * _U64 / (1.0 - n * _U64)


def _proved_top_eigenvalue_bound(gram: Tensor, mu: float) -> float | None:
    """A proved upper bound on lambda_max(gram) near ``mu``, or None when mu I - gram is not positive definite.

    A floating-point Cholesky of H = mu I - G that completes gives R with R^T R = H + dH,
    |dH| <= g |R^T||R| with g = gamma_{n+1} (Demmel; Higham, Thm 10.3), so lambda_min(H) >= -g ||R||_F^2
    >= -g tr(H) / (1 - g); forming H's diagonal adds at most u |H_ii|. gamma_{2(n+1)} covers blocked orderings.
    """
    n = gram.shape[-1]
    h = -gram
    h.diagonal().add_(mu)
    _, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    g = _gamma(2 * (n + 1))
    trace = float(h.diagonal().sum()) * (1 + _gamma(n))
    diagonal_rounding = _U64 * float(h.diagonal().abs().max())
    return mu + g * trace / (1 - g) + diagonal_rounding


def _first_proved(gram: Tensor, estimate: float, gaps: tuple[float, ...] = _CANDIDATE_GAPS) -> float | None:
    for gap in gaps:
        # The floor keeps mu I - G positive definite for an all-zero matrix.
        proved = _proved_top_eigenvalue_bound(gram, estimate * (1 + gap) + 1e-300)
        if proved is not None:
            return proved
    return None


# Largest entries in this range give a Gram far from float64's overflow and underflow thresholds.
_SAFE_RANGE = (2.0**-300, 2.0**300)


def _power_of_two_above(x: float) -> float:
    """The smallest power of two >= x > 0: dividing by it is exact (up to underflow) and keeps entries <= 1."""
    mantissa, exponent = math.frexp(x)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def _estimate(gram: Tensor, start: Tensor, iters: int | None) -> float:
    """lambda_max(gram) from below-ish: eigvalsh (``iters`` None), or Rayleigh-Ritz on ``iters`` power iterates."""
    if iters is None:
        return float(torch.linalg.eigvalsh(gram)[-1])
    iterates = [start]
    for _ in range(iters):
        iterates.append(F.normalize(gram @ iterates[-1], dim=0))
    # Rayleigh-Ritz on all the iterates (the Krylov space) estimates far better than the last one alone.
    krylov = torch.linalg.qr(torch.stack(iterates, dim=1)).Q
    return float(torch.linalg.eigvalsh(krylov.mT @ gram @ krylov)[-1])


def certified_spectral_bound(weight: Tensor, iters: int | None = 8) -> Tensor:
    """A proved upper bound on sigma_1 per matrix: an estimate of lambda_max(W^T W), confirmed by a Cholesky.

    The estimate is eigvalsh's lambda_max (``iters`` None: "exact" mode, which alone can undershoot by a few
    ulps) or Rayleigh-Ritz on ``iters`` power iterates of the smaller Gram G from a fixed start (cheaper, an
    under-estimate). mu = estimate x (1 + gap) is an upper bound exactly when mu I - G is positive
    semi-definite, which one Cholesky (n^3/3 flops) proves; the tightest passing gap is kept, and if none
    passes the candidates start from eigvalsh's lambda_max instead. W with max |W_ij| outside 2^-300..2^300 is
    first divided by a power of two >= it (exact), so G never overflows; forming G in float64 moves lambda_max
    by at most gamma_k ||W||_F^2 (k its inner dimension), which is added, and so is what underflow can lose
    (k n 2^-1074); a final 1 + 1e-12 covers the scalar arithmetic. NaN or inf weights raise ArithmeticError.
    """
    w = weight.detach().to(torch.float64)
    if w.shape[-2] < w.shape[-1]:
        w = w.mT
    flat = w.reshape(-1, *w.shape[-2:])
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(flat.shape[-1], generator=gen, dtype=torch.float64).to(w.device)
    bounds = []
    for matrix in flat:
        largest = float(torch.linalg.vector_norm(matrix, ord=math.inf)) if matrix.numel() else 0.0
        if not math.isfinite(largest):
            raise ArithmeticError("no certified spectral bound for a weight holding NaN or inf")
        if largest == 0.0:
            bounds.append(0.0)
            continue
        # Rescaled (a copy) only where the Gram could overflow or underflow badly: the usual weights are used as is.
        scale = 1.0 if _SAFE_RANGE[0] <= largest <= _SAFE_RANGE[1] else _power_of_two_above(largest)
        scaled = matrix if scale == 1.0 else matrix / scale
        gram = scaled.mT @ scaled
        trace = float(gram.diagonal().sum())  # ||W / scale||_F^2 up to rounding, at most k n
        lam = _first_proved(gram, _estimate(gram, start, iters), _CANDIDATE_GAPS if iters else _EXACT_GAPS)
        if lam is None and iters is not None:  # power iteration had not converged: start from eigvalsh instead
            lam = _first_proved(gram, _estimate(gram, start, None), _EXACT_GAPS)
        if lam is None:
            raise ArithmeticError("no certified spectral bound: no candidate above eigvalsh's value was proved")
        # |G_computed - G| <= gamma_k |W|^T|W| entrywise, whose norm is at most ||W||_F^2 <= trace / (1 - gamma_k).
        k, n = matrix.shape[-2], matrix.shape[-1]
        gram_rounding = _gamma(k) * trace * (1 + _gamma(n)) / (1 - _gamma(k)) + k * n * 2.0**-1074
        bounds.append(math.sqrt(lam + gram_rounding) * (1 + 1e-12) * scale)
    return torch.tensor(bounds, dtype=torch.float64, device=w.device).reshape(w.shape[:-2])


def _frobenius_up(x: Tensor) -> float:
    """||x||_F rounded up past the float64 rounding of its sum of squares."""
    return math.sqrt(float(x.pow(2).sum()) * (1 + _gamma(x.numel() + 1))) * (1 + 4 * _U64)


def certified_product_bound(
    left: Tensor, right: Tensor, sigma_right: Tensor, sigma_of: Callable[[Tensor], Tensor]
) -> Tensor:
    """A proved upper bound on sigma_1(L_h R_h) per batch entry, for L [..., m, k] (m >= k) and R [..., k, n].

    sigma(L R) = sigma(T R) for the QR factor T of L = Q T: a [k, n] product instead of an [m, n] one. The
    float64 QR is not trusted. With E = T^T T - L^T L, sigma(L R)^2 = lambda_max(R^T (T^T T - E) R)
    <= sigma(T R)^2 + ||E|| sigma(R)^2, where ||E|| <= ||fl(E)||_F plus the rounding of forming both Grams
    (gamma ||T||_F^2 and gamma ||L||_F^2) and their difference; and sigma(T R) <= sigma(fl(T R)) plus
    gamma_k ||T||_F ||R||_F, the rounding of the product. ``sigma_right`` (per entry) and ``sigma_of`` must be
    proved upper bounds on spectral norms.
    """
    left, right = left.detach().to(torch.float64), right.detach().to(torch.float64)
    k = left.shape[-1]
    factor = torch.linalg.qr(left).R
    product = factor @ right
    sigma_product = sigma_of(product)
    bounds = []
    for i, (t, l_h, r_h) in enumerate(zip(factor.reshape(-1, k, k), left.reshape(-1, *left.shape[-2:]),
                                          right.reshape(-1, *right.shape[-2:]), strict=True)):  # fmt: skip
        t_f, l_f, r_f = _frobenius_up(t), _frobenius_up(l_h), _frobenius_up(r_h)
        residual = _frobenius_up(t.mT @ t - l_h.mT @ l_h) * (1 + 2 * _U64)
        residual += _gamma(k) * t_f**2 + _gamma(l_h.shape[-2]) * l_f**2
        tr = float(sigma_product.reshape(-1)[i]) + _gamma(k) * t_f * r_f
        bounds.append(math.sqrt(tr**2 + residual * float(sigma_right.reshape(-1)[i]) ** 2) * (1 + 1e-12))
    return torch.tensor(bounds, dtype=torch.float64, device=left.device).reshape(left.shape[:-2])
