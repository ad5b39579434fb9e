"""Compose the modules' own certificates into a global Lipschitz bound, from the stored weights only.

Weight norms are recomputed (exact float64 eigenvalues of the smaller Gram, or with ``power_iters``
power iteration confirmed by a Cholesky factorization: a proved upper bound); numbers recorded in the
checkpoint's metadata are compared, never used.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .nn import Bound, NormOf
from .spectral import certified_spectral_bound, rms_norm_exact, rms_scale

# Relative disagreement between recorded and recomputed norms worth reporting.
_DISAGREEMENT = 1e-3
UNBOUNDED_REASON = {"baseline-gpt": "RMSNorm rescales small inputs without limit: no global Lipschitz bound"}


@dataclass
class ModuleRow:
    name: str
    log10_paper: float
    log10_tight: float
    log10_running_paper: float
    log10_running_tight: float
    out_norm_tight: float
    terms: dict[str, float]


@dataclass
class CertifyReport:
    path: str
    arch: str
    norm_pair: str
    norm_method: str
    log10_paper: float  # +inf when the architecture has no global bound
    log10_tight: float
    rows: list[ModuleRow] = field(default_factory=list)
    disagreements: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (recorded, measured)
    unbounded_reason: str | None = None
    seconds: float = 0.0

    @property
    def log10_bound(self) -> float:
        """The tightest sound bound: what gates and certified accuracy use."""
        return min(self.log10_paper, self.log10_tight)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.path,
            "arch": self.arch,
            "norm_pair": self.norm_pair,
            "norm_method": self.norm_method,
            "log10_bound": self.log10_bound,
            "log10_paper": self.log10_paper,
            "log10_tight": self.log10_tight,
            "unbounded_reason": self.unbounded_reason,
            "modules": [asdict(row) for row in self.rows],
            "metadata_disagreements": {k: {"recorded": a, "measured": b} for k, (a, b) in self.disagreements.items()},
            "seconds": self.seconds,
        }


def exact_norm(weight: torch.Tensor) -> torch.Tensor:
    """Exact RMS->RMS norm per matrix, float64 SVD."""
    return rms_norm_exact(weight, dtype=torch.float64)


def power_norm(iters: int) -> NormOf:
    """A proved upper bound on the RMS->RMS norm from ``iters`` power iterations: faster, never below the truth."""

    def norm_of(weight: torch.Tensor) -> torch.Tensor:
        return certified_spectral_bound(weight, iters=iters) / rms_scale(weight)

    return norm_of


def norm_pair(arch: str) -> str:
    if arch == "lipschitz-mlp":
        return "L2 -> L2 (input pixels to logits)"
    return "max over positions of per-token RMS: token embeddings (RMS <= 1) -> logits"


def _compose(paper: list[tuple[str, Bound]], tight: list[tuple[str, Bound]]) -> list[ModuleRow]:
    rows, run_p, run_t = [], 0.0, 0.0
    for (name, bp), (_, bt) in zip(paper, tight, strict=True):
        run_p += bp.log10_lipschitz
        run_t += bt.log10_lipschitz
        rows.append(ModuleRow(name, bp.log10_lipschitz, bt.log10_lipschitz, run_p, run_t, bt.out_norm, bt.terms))
    return rows


def _memoized(norm_of: NormOf) -> NormOf:
    """Each stored weight's norm once per certificate: both bounds and the metadata check share it."""
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cached(weight: torch.Tensor) -> torch.Tensor:
        if id(weight) not in cache:
            cache[id(weight)] = (weight, norm_of(weight))  # holding the weight keeps its id unique
        return cache[id(weight)][1]

    return cached


def certify_loaded(ckpt: checkpoint.Checkpoint, power_iters: int | None = None) -> CertifyReport:
    started = time.perf_counter()
    model: nn.Module = ckpt.model.double()
    norm_of = _memoized(exact_norm if power_iters is None else power_norm(power_iters))
    exact = power_iters is None
    method = "exact (float64)" if exact else f"power iteration ({power_iters} steps) proved by Cholesky"
    report = CertifyReport(str(ckpt.path), ckpt.arch, norm_pair(ckpt.arch), method, math.inf, math.inf)
    for name, p in model.named_parameters():
        recorded = ckpt.spectral_norms.get(name)
        if p.dim() >= 2 and recorded is not None:
            measured = float(norm_of(p).max())
            # An upper bound can only prove a recorded value too high; an exact norm proves either way.
            too_high = recorded > measured * (1 + _DISAGREEMENT)
            too_low = exact and recorded < measured * (1 - _DISAGREEMENT)
            if too_high or too_low:
                report.disagreements[name] = (recorded, measured)
    if hasattr(model, "bound"):
        with torch.no_grad():
            report.rows = _compose(model.bound(norm_of, tight=False), model.bound(norm_of, tight=True))
        report.log10_paper = report.rows[-1].log10_running_paper
        report.log10_tight = report.rows[-1].log10_running_tight
    else:
        report.unbounded_reason = UNBOUNDED_REASON.get(ckpt.arch, "this architecture has no certificate")
    report.seconds = time.perf_counter() - started
    return report


def certify(path: str | Path, power_iters: int | None = None) -> CertifyReport:
    """Both global Lipschitz bounds of the checkpoint at ``path``."""
    return certify_loaded(checkpoint.load(path), power_iters)
