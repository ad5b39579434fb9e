"""Compose the modules' own certificates into a global Lipschitz bound, from the stored weights only.

Weight norms are recomputed and proved: float64 eigenvalues of the smaller Gram (or, with ``power_iters``,
power iteration), each confirmed an upper bound by a Cholesky factorization; numbers recorded in the
checkpoint's metadata are compared, never used. The statement proved is the model's own domain (``model.domain()``),
its norm pair, and exact arithmetic on the stored weights (docs/certify.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .bounds import Bound, NormOf, add_log10
from .errors import UserError
from .nn import certified_map
from .spectral import certified_spectral_bound, rms_scale

# Relative disagreement between recorded and recomputed norms worth reporting.
_DISAGREEMENT = 1e-3
# Dtypes whose forward-pass rounding is far larger than a tight bound's slack.
LOW_PRECISION = (torch.bfloat16, torch.float16)
_PROBE_TOKENS = 3
# More power-iteration steps buy nothing (the Cholesky proof covers the error) and only let a typo hang certify.
MAX_POWER_ITERS = 1000


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
    domain: str  # the inputs the bound covers, in words (no domain: the architecture has no certificate)
    norm_pair: str
    arithmetic: str  # what the bound assumes about arithmetic
    stored_dtype: str
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

    @property
    def low_precision(self) -> bool:
        return self.stored_dtype in {str(d).removeprefix("torch.") for d in LOW_PRECISION}

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.path,
            "arch": self.arch,
            "domain": self.domain,
            "norm_pair": self.norm_pair,
            "arithmetic": self.arithmetic,
            "stored_dtype": self.stored_dtype,
            "low_precision": self.low_precision,
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
    """The RMS->RMS norm per matrix from float64 eigvalsh, proved an upper bound by a Cholesky (within ~1e-10)."""
    return certified_spectral_bound(weight, iters=None) / rms_scale(weight)


def power_norm(iters: int) -> NormOf:
    """A proved upper bound on the RMS->RMS norm from ``iters`` power iterations: faster, never below the truth."""

    def norm_of(weight: torch.Tensor) -> torch.Tensor:
        return certified_spectral_bound(weight, iters=iters) / rms_scale(weight)

    return norm_of


def arithmetic(dtype: torch.dtype) -> str:
    """What the bound assumes about arithmetic, for weights stored in ``dtype``."""
    stated = f"exact real arithmetic on the stored {str(dtype).removeprefix('torch.')} weights"
    if dtype in LOW_PRECISION:
        return stated + "; a forward pass in this dtype rounds far beyond the bound's slack, which is not covered"
    return stated + "; floating-point rounding of a forward pass is not covered"


def _compose(paper: list[tuple[str, Bound]], tight: list[tuple[str, Bound]]) -> list[ModuleRow]:
    rows, run_p, run_t = [], 0.0, 0.0
    for (name, bp), (_, bt) in zip(paper, tight, strict=True):
        run_p = add_log10(run_p, bp.log10_lipschitz)
        run_t = add_log10(run_t, bt.log10_lipschitz)
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


def check_certifiable(model: nn.Module, where: str) -> None:
    """Refuse what no bound may be printed for: NaN or inf in any weight or scale, or a forward pass that is not
    finite on the model's own domain (probed at 0 and at two random points; e.g. mlp_gain 0 makes GeLU 0/0)."""
    for spec in fields(model.config):
        value = getattr(model.config, spec.name)
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(spec.default, float) and not (real and math.isfinite(value)):
            raise UserError(f"{where}: model_config.{spec.name} is {value!r}: a certificate needs a finite number")
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise UserError(f"{where}: weight {name} holds NaN or inf: no certificate")
    domain = model.domain()
    probe = torch.cat([torch.zeros(1, *domain.shape(_PROBE_TOKENS), dtype=torch.float64),
                       domain.sample(2, _PROBE_TOKENS, torch.Generator().manual_seed(0))])  # fmt: skip
    with torch.no_grad():
        out = certified_map(model)(probe.to(next(model.parameters()).device))
    if not bool(torch.isfinite(out).all()):
        raise UserError(
            f"{where}: the model's forward pass is not finite on its certified domain (e.g. mlp_gain 0): "
            "no certificate for a model that outputs NaN"
        )


def check_power_iters(power_iters: int | None) -> None:
    if power_iters is not None and not 1 <= power_iters <= MAX_POWER_ITERS:
        raise UserError(f"--power-iters must be between 1 and {MAX_POWER_ITERS}, got {power_iters}")


def certify_loaded(ckpt: checkpoint.Checkpoint, power_iters: int | None = None) -> CertifyReport:
    check_power_iters(power_iters)
    started = time.perf_counter()
    stored_dtype = next(ckpt.model.parameters()).dtype
    model: nn.Module = ckpt.model.double()
    norm_of = _memoized(exact_norm if power_iters is None else power_norm(power_iters))
    exact = power_iters is None
    estimate = "eigvalsh (float64)" if exact else f"power iteration ({power_iters} steps)"
    method = f"{estimate} proved by Cholesky"
    certified = hasattr(model, "bound")
    if certified:
        check_certifiable(model, str(ckpt.path))
    domain = model.domain() if certified else None
    report = CertifyReport(
        str(ckpt.path), ckpt.arch,
        domain.statement() if domain else "none (no certificate)",
        domain.norm_description if domain else "none",
        arithmetic(stored_dtype), str(stored_dtype).removeprefix("torch."), method, math.inf, math.inf,
    )  # fmt: skip
    if not certified:
        # The model class says why it has no certificate (e.g. BaselineGPT's RMSNorm).
        report.unbounded_reason = getattr(model, "unbounded_reason", "this architecture has no certificate")
        report.seconds = time.perf_counter() - started
        return report
    try:
        for name, p in model.named_parameters():
            recorded = ckpt.spectral_norms.get(name)
            if p.dim() >= 2 and recorded is not None:
                measured = float(norm_of(p).max())
                # An upper bound can only prove a recorded value too high; an exact norm proves either way.
                too_high = recorded > measured * (1 + _DISAGREEMENT)
                too_low = exact and recorded < measured * (1 - _DISAGREEMENT)
                if too_high or too_low:
                    report.disagreements[name] = (recorded, measured)
        with torch.no_grad():
            report.rows = _compose(model.bound(norm_of, tight=False), model.bound(norm_of, tight=True))
    except ArithmeticError as exc:
        raise UserError(f"{ckpt.path}: {exc}") from exc
    report.log10_paper = report.rows[-1].log10_running_paper
    report.log10_tight = report.rows[-1].log10_running_tight
    report.seconds = time.perf_counter() - started
    return report


def certify(path: str | Path, power_iters: int | None = None) -> CertifyReport:
    """Both global Lipschitz bounds of the checkpoint at ``path``."""
    check_power_iters(power_iters)  # before reading a possibly large file
    return certify_loaded(checkpoint.load(path), power_iters)
