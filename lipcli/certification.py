"""Compose the modules' own certificates into a global Lipschitz bound, from the stored weights only.

Weight norms are recomputed exactly (float64 SVD); numbers recorded in the checkpoint's metadata
are compared against them, never used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .nn import Bound
from .spectral import rms_norm_exact

# Relative disagreement between recorded and recomputed norms worth reporting.
_DISAGREEMENT = 1e-3


@dataclass
class ModuleRow:
    name: str
    log10_lipschitz: float
    log10_running: float
    out_norm: float
    terms: dict[str, float]


@dataclass
class CertifyReport:
    path: str
    arch: str
    norm_pair: str
    log10_bound: float  # +inf when the architecture has no global bound (e.g. RMSNorm)
    rows: list[ModuleRow] = field(default_factory=list)
    disagreements: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (recorded, measured)
    seconds: float = 0.0


def exact_norm(weight: torch.Tensor) -> float:
    return float(rms_norm_exact(weight, dtype=torch.float64))


def norm_pair(arch: str) -> str:
    if arch == "lipschitz-mlp":
        return "L2 -> L2 (input pixels to logits)"
    return "per-token RMS, max over positions (token embeddings of RMS <= 1 -> logits)"


def compose(rows: list[tuple[str, Bound]]) -> list[ModuleRow]:
    running, out = 0.0, []
    for name, b in rows:
        running += b.log10_lipschitz
        out.append(ModuleRow(name, b.log10_lipschitz, running, b.out_norm, b.terms))
    return out


def certify_loaded(ckpt: checkpoint.Checkpoint) -> CertifyReport:
    started = time.perf_counter()
    model: nn.Module = ckpt.model
    report = CertifyReport(str(ckpt.path), ckpt.arch, norm_pair(ckpt.arch), math.inf)
    for name, p in model.named_parameters():
        recorded = ckpt.spectral_norms.get(name)
        if p.dim() == 2 and recorded is not None:
            measured = exact_norm(p)
            if abs(recorded - measured) > _DISAGREEMENT * max(measured, 1e-12):
                report.disagreements[name] = (recorded, measured)
    if hasattr(model, "bound"):
        report.rows = compose(model.bound(exact_norm))
        report.log10_bound = report.rows[-1].log10_running
    report.seconds = time.perf_counter() - started
    return report


def certify_model(path: str | Path) -> CertifyReport:
    """The global Lipschitz bound of the checkpoint at ``path``."""
    return certify_loaded(checkpoint.load(path))
