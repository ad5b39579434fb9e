"""The paper's weight constraints: functions that pull a weight matrix back under sigma_max.

Each method works on a matrix measured in RMS->RMS units (see :func:`lipcli.spectral.rms_scale`);
:func:`project` converts to and from those units, so no method re-derives the scale. The methods
know nothing about training: the optimizer hands over what it knows in a :class:`CapContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import UserError
from .spectral import MUON_COEFFS, msign, power_iteration, rms_scale, spectral_norm_exact


@dataclass
class CapContext:
    """What a constraint may use besides the matrix itself."""

    sigma_max: float
    # A sound upper bound on the RMS->RMS norm of the matrix before projection (softcap's coupling).
    norm_bound: float | None = None
    # lr * wd of the step just taken (spectral weight decay strength).
    decay: float = 0.0
    # Per-parameter memory that persists across steps (the power-iteration warm start).
    state: dict = field(default_factory=dict)


def _top_pair(m: Tensor, ctx: CapContext, iters: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    warm = ctx.state.get("power_v")
    sigma, u, v = power_iteration(m, warm, iters=iters if warm is not None else 16)
    ctx.state["power_v"] = v
    return sigma, u, v


def _outer(sigma_change: Tensor, u: Tensor, v: Tensor) -> Tensor:
    return sigma_change[..., None, None] * u.unsqueeze(-1) * v.unsqueeze(-2)


def no_constraint(m: Tensor, ctx: CapContext) -> Tensor:
    """Leave the matrix as it is. No guarantee."""
    return m


def spectral_weight_decay(m: Tensor, ctx: CapContext) -> Tensor:
    """Shrink only the top singular value: sigma_1 -> (1 - decay) sigma_1 (power iteration).

    No guarantee: it slows growth of sigma_1 but never bounds it; certify must measure.
    """
    sigma, u, v = _top_pair(m, ctx)
    return m - _outer(ctx.decay * sigma, u, v).to(m.dtype)


def spectral_normalize(m: Tensor, ctx: CapContext) -> Tensor:
    """Divide by max(1, sigma_1 / sigma_max) with the exact sigma_1 (an eigenvalue of the smaller Gram).

    The reference estimates sigma_1 by power iteration, which under Muon's flat spectra
    under-estimated it by 7% in a 20-step test here: that breaks the bound, so we pay for exactness.
    """
    sigma = spectral_norm_exact(m, torch.float32)
    factor = (sigma / ctx.sigma_max).clamp_min(1.0)
    return m / factor[..., None, None].to(m.dtype)


def spectral_hammer(m: Tensor, ctx: CapContext) -> Tensor:
    """Set the top singular value to sigma_max, leave the rest (suited to AdamW's low-rank steps).

    No guarantee: the second singular value may exceed sigma_max, and sigma_1 comes from power
    iteration; certify must measure.
    """
    sigma, u, v = _top_pair(m, ctx)
    return m + _outer(ctx.sigma_max - sigma, u, v).to(m.dtype)


# f(b) = 1 - 3b^2 + 3b^3 - b^4 is the soft cap's gain at the top of the range, with b = alpha k^2;
# it decreases on [0, 1/3], where the two passes are monotone on [0, k]; f(1/3) = 62/81.
_SOFTCAP_MIN_RATIO = 62.0 / 81.0


def _softcap_gain(b: float) -> float:
    return 1.0 - 3.0 * b**2 + 3.0 * b**3 - b**4


def softcap_strength(norm_bound: float, sigma_max: float) -> float:
    """Smallest alpha >= 0 with u(norm_bound) = sigma_max for one soft-cap pass (needs ratio >= 62/81).

    u(s) = t (1 + alpha t^2) with t = s (1 - alpha s^2); solving u(k) = w_max is the paper's quartic
    -k^9 a^4 + 3 k^7 a^3 - 3 k^5 a^2 + (k - w_max) = 0; bisection on b = alpha k^2 in [0, 1/3] is
    exact to float precision and never picks a root outside the monotone range.
    """
    if norm_bound <= sigma_max:
        return 0.0
    ratio = sigma_max / norm_bound
    if ratio < _SOFTCAP_MIN_RATIO * (1 - 1e-9):
        raise UserError(f"one soft-cap pass cannot shrink {norm_bound} to {sigma_max}")
    lo, hi = 0.0, 1.0 / 3.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _softcap_gain(mid) > ratio:
            lo = mid
        else:
            hi = mid
    return hi / norm_bound**2


def _softcap_pass(m: Tensor, alpha: float) -> Tensor:
    wide = m.shape[-2] < m.shape[-1]
    for sign in (-1.0, 1.0):
        if wide:
            m = m + sign * alpha * (m @ m.mT) @ m
        else:
            m = m + sign * alpha * m @ (m.mT @ m)
    return m


def spectral_softcap(m: Tensor, ctx: CapContext) -> Tensor:
    """The paper's odd-polynomial soft cap, strength coupled to a known norm bound.

    Guarantee: if every singular value is <= ctx.norm_bound (the optimizer's
    sigma_max (1 - lr wd) + max update norm), afterwards every one is <= sigma_max. Bounds beyond one
    pass's reach (ratio < 62/81) get several passes, each monotone, so the guarantee composes.
    Without a norm bound it measures one exactly (float64), which keeps it sound on any matrix.
    """
    k = ctx.norm_bound
    if k is None:
        k = float(spectral_norm_exact(m).max()) * (1 + 1e-12)
    work = m.float()
    while k > ctx.sigma_max:
        target = max(ctx.sigma_max, k * _SOFTCAP_MIN_RATIO)
        work = _softcap_pass(work, softcap_strength(k, target))
        k = target
    return work.to(m.dtype)


# Hard cap needs msign accurate on small eigenvalues of the Gram: many quintic steps, then polish to 1.
_HARDCAP_COEFFS = MUON_COEFFS * 2


def spectral_hardcap(m: Tensor, ctx: CapContext) -> Tensor:
    """Clip every singular value at sigma_max without an SVD (Su's msign form of the matrix clip).

    With M = W / sigma_max, clip(M) = 1/2 [(msign M + M) + (msign M - M) msign(M^T M - I)]: for
    each singular value s that is s when s < 1 and msign's value (<= 1 after the cubic polish) when
    s > 1. An unconverged sign near s = 1 costs at most (s - 1)/2 times its error.
    """
    work = m.float() / ctx.sigma_max
    polar = msign(work, _HARDCAP_COEFFS, polish=4)
    wide = work.shape[-2] < work.shape[-1]
    gram = work @ work.mT if wide else work.mT @ work
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    sign = msign(gram - eye, _HARDCAP_COEFFS, polish=4)
    above = sign @ (polar - work) if wide else (polar - work) @ sign
    return ((polar + work + above) * (ctx.sigma_max / 2)).to(m.dtype)


def svd_clip(m: Tensor, ctx: CapContext) -> Tensor:
    """Exact clip U min(S, sigma_max) V^T through an SVD: the reference the others are tested against."""
    u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
    return (u * s.clamp(max=ctx.sigma_max).unsqueeze(-2) @ vh).to(m.dtype)


@dataclass(frozen=True)
class Method:
    apply: Callable[[Tensor, CapContext], Tensor]
    enforces: bool  # whether every singular value is <= sigma_max afterwards (see each docstring)


METHODS: dict[str, Method] = {
    "none": Method(no_constraint, enforces=False),
    "wd": Method(no_constraint, enforces=False),
    "spec-wd": Method(spectral_weight_decay, enforces=False),
    "normalize": Method(spectral_normalize, enforces=True),
    "hammer": Method(spectral_hammer, enforces=False),
    "softcap": Method(spectral_softcap, enforces=True),
    "hardcap": Method(spectral_hardcap, enforces=True),
    "svd": Method(svd_clip, enforces=True),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown constraint method {name!r}; choose one of: {', '.join(METHODS)}") from None


def project(weight: Tensor, method: str, ctx: CapContext) -> Tensor:
    """Apply ``method`` to ``weight`` [..., fan_out, fan_in], with sigma_max in RMS->RMS units."""
    scale = rms_scale(weight)
    return get_method(method).apply(weight / scale, ctx) * scale
