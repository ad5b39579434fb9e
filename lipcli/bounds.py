"""The arithmetic of certificates: a module's :class:`Bound` and the log10 sums that compose them, rounded up.

Every bound is in the per-token RMS norm, max over positions (``||X|| = max_t RMS(x_t)``), for inputs
whose tokens all have RMS <= ``in_norm`` (the flattened-input models use L2 instead). Lipschitz constants
are carried as log10 so products of hundreds of layers never overflow. Weight norms come from a ``norm_of``
function (certify passes the exact float64 RMS->RMS norm), never from metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

# RMS->RMS operator norm of each matrix in a [..., fan_out, fan_in] tensor (certify: exact, float64).
NormOf = Callable[[Tensor], Tensor]


def log10(x: float) -> float:
    """log10 of a non-negative bound term; a NaN or negative term is a bug or an overflow, never a bound of 0."""
    if math.isnan(x) or x < 0:
        raise ArithmeticError(f"a bound term is {x!r}: overflow or a signed factor, no certificate")
    return math.log10(x) if x > 0 else -math.inf


# Relative margin on every Bound: covers the few hundred float64 operations of a module's formula (each within
# 2^-53 relative); log10's own rounding (<= 2 ulp) is covered by 4 ulp on top.
ROUNDING_MARGIN = 1e-12


def round_up_log10(value: float) -> float:
    """``value`` (a computed log10) moved up past its rounding: the log10 of a bound that is still a bound."""
    if not math.isfinite(value):
        return value
    return value + ROUNDING_MARGIN / math.log(10) + 4 * math.ulp(value)


@dataclass
class Bound:
    """A module's certificate on inputs of RMS <= in_norm: log10 Lipschitz constant and output RMS bound.

    Both numbers are rounded up on construction by :data:`ROUNDING_MARGIN`, so the module's floating-point
    arithmetic can only make them larger than the exact values; NaN is refused (it never bounds anything).
    """

    log10_lipschitz: float
    out_norm: float
    terms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if math.isnan(self.log10_lipschitz):
            raise ArithmeticError("a Lipschitz bound came out NaN: overflow in the bound's arithmetic")
        self.log10_lipschitz = round_up_log10(self.log10_lipschitz)
        # out_norm is NaN only where a model has no output-norm bound (an MLP on an unbounded domain).
        self.out_norm = self.out_norm * (1 + ROUNDING_MARGIN)


def log10_affine(c: float, a: float, log10_x: float) -> float:
    """log10(c + a * 10**log10_x) without overflow."""
    if log10_x > 300:
        return log10(a) + log10_x + math.log10(1.0 + c / a * 10.0 ** (-log10_x))
    return log10(c + a * 10.0**log10_x)


def add_log10(total: float, term: float) -> float:
    """total + term for log10 factors, rounded up one ulp (the sum of the exact logs never exceeds it).

    -inf is an exactly zero factor and wins over +inf, which only ever stands for an overflowed finite one.
    """
    if -math.inf in (total, term):
        return -math.inf
    total += term
    return total if math.isinf(total) else math.nextafter(total, math.inf)
