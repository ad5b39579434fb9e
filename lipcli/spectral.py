"""Matrix primitives on weight tensors of shape [..., fan_out, fan_in].

Every norm in lipcli is the RMS->RMS operator norm ``sqrt(fan_in / fan_out) * sigma_1(W)`` (the
paper's w_max convention). :func:`rms_scale` is the only place that factor is written.
"""

from __future__ import annotations

import math
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
    # The Frobenius norm bounds sigma_1, so every singular value starts in [0, 1].
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


def gram_upper_bound(weight: Tensor, iters: int = 6) -> Tensor:
    """Certified upper bound on sigma_1 by Gram iteration (Delattre et al. 2023), in float64.

    sigma_1(W)^(2^t) = sigma_1(G_t) <= ||G_t||_F with G_{t+1} = G_t^T G_t; rescaling keeps it finite.
    """
    g = weight.detach().to(torch.float64)
    if g.shape[-2] < g.shape[-1]:
        g = g.mT
    log_scale = torch.zeros(g.shape[:-2], dtype=torch.float64, device=g.device)
    for _ in range(iters):
        fro = torch.linalg.matrix_norm(g, keepdim=True).clamp_min(1e-300)
        g = g / fro
        log_scale = 2.0 * (log_scale + fro.squeeze(-1).squeeze(-1).log())
        g = g.mT @ g
    log_bound = (log_scale + torch.linalg.matrix_norm(g).clamp_min(1e-300).log()) / 2**iters
    return log_bound.exp()
