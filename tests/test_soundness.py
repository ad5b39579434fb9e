"""Property-based soundness: for random small models within the accepted ranges, certify either refuses the
model with a UserError or proves a bound no adversarial search over input pairs on the certified domain beats.

Random weights (not only trained ones) at any norm, scales of any sign (0 where legal), biases, position biases,
GeLU or GroupSort, stored in float32, bfloat16 or float16, and now and then a NaN or inf somewhere.
LIPCLI_SOUNDNESS_EXAMPLES overrides the number of draws.
bench/soundness.py runs the same property on thousands of examples.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import erf

from lipcli.certification import certify_loaded
from lipcli.checkpoint import Checkpoint
from lipcli.errors import UserError
from lipcli.models import MIN_SCALE, build_model, config_dict
from lipcli.nn import GELU_MAX_SLOPE
from lipcli.sensitivity import model_sensitivity

# About 70% of the drawn examples are legal and get searched: 290 draws certify over 200 models.
EXAMPLES = int(os.environ.get("LIPCLI_SOUNDNESS_EXAMPLES", "290"))
# The search evaluates f in float64 on pairs as close as 1e-5 of the domain's scale, and f(x) - f(y) cancels
# against output offsets (biases of size ~10) far larger than the difference: a difference quotient carries
# an absolute error of about 2^-52 x 10 / 1e-5 ~ 1e-10 (seen: 1.4e-12 above an exact bound of 7.5e-7, and
# 2e-16 against 2.6e-17 for a model scaled by 1e-15). Real soundness bugs are O(1) factors.
MEASUREMENT_SLACK = 1e-6
MEASUREMENT_FLOOR = 1e-8
SEARCH = {"restarts": 1, "steps": 6, "batch": 4}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
POISONS = ("nan", "inf", "-inf")


def test_gelu_slope_constant_is_at_least_the_true_maximum():
    """GeLU'(x) = Phi(x) + x phi(x) peaks where GeLU''(x) = phi(x)(2 - x^2) = 0: found here by root finding."""

    def slope(x: float) -> float:
        return 0.5 * (1 + erf(x / math.sqrt(2))) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def curvature(x: float) -> float:
        return math.exp(-x * x / 2) / math.sqrt(2 * math.pi) * (2 - x * x)

    peak = brentq(curvature, 0.5, 3.0, xtol=1e-15)
    true_max = slope(peak)
    assert true_max == pytest.approx(1.1289041451851, abs=1e-12)
    # float64 evaluation of slope() is within a few ulps: the constant must clear it with room to spare.
    assert GELU_MAX_SLOPE >= true_max * (1 + 1e-12)
    # ... and it is the maximum over a dense grid in float64 too (the activation the forward pass divides by).
    xs = torch.linspace(-10, 10, 2_000_001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.nn.functional.gelu(xs).sum(), xs)
    assert float(grad.max()) <= GELU_MAX_SLOPE


@dataclass
class Example:
    """One drawn model, what was done to it, and the rule for whether certify must refuse it."""

    arch: str
    config: dict
    dtype: torch.dtype
    weight_scales: list[float]
    poison: tuple[str, str] | None  # (where, value): a scale name or "weight"
    seed: int

    @property
    def must_refuse(self) -> bool:
        if self.poison is not None:
            return True
        # GeLU(0 z) / (0 c) is 0/0: the one legal-looking configuration whose forward pass is NaN.
        # GeLU(g z) / g is 0/0 once g rounds to 0: lipcli.models refuses |g| < MIN_SCALE with GeLU.
        if self.arch != "lipschitz-gpt":
            return False
        return abs(self.config["mlp_gain"]) < MIN_SCALE and self.config["activation"] == "gelu"


def _scale(limit: float) -> st.SearchStrategy[float]:
    """Any sign, magnitudes across decades, exactly 0 now and then (about one draw in twelve)."""
    floats = st.floats(-limit, limit, allow_nan=False, allow_subnormal=False)
    return st.one_of(floats, floats, st.sampled_from([-1.0, 1.0, 1 / 3, -1 / 3, 0.0]), floats, floats)


@st.composite
def gpt_examples(draw: st.DrawFn) -> Example:
    n_heads = draw(st.sampled_from([1, 2]))
    n_layers = draw(st.integers(1, 2))
    activation = draw(st.sampled_from(["gelu", "groupsort"]))
    config = {
        "vocab_size": draw(st.integers(3, 9)),
        "d_model": 4 * n_heads,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "context": draw(st.integers(2, 4)),
        "mlp_ratio": draw(st.integers(1, 2)),
        "residual_scale": 2 * n_layers * draw(st.floats(0.05, 0.95)),
        "softmax_scale": draw(_scale(30.0)),
        "content_heads": draw(st.one_of(st.none(), st.integers(0, n_heads))),  # None: every head reads content
        "content_layers": draw(st.one_of(st.none(), st.integers(0, n_layers))),  # None: every layer reads content
        "final_scale": draw(_scale(10.0)),
        "zero_init": draw(st.booleans()),
        "position_bias": draw(st.booleans()),
        "content_bias": draw(st.sampled_from(["learned", "alibi", "none"])),
        "content_bias_limit": draw(st.one_of(st.none(), st.floats(0.1, 8.0))),
        "attn_out_scale": draw(_scale(3.0)),
        "mlp_gain": draw(_scale(5.0)),
        "bias": draw(st.booleans()),
        "activation": activation,
        "group_size": 2,
        "seed": draw(st.integers(0, 2**16)),
    }
    if not (config["position_bias"] and config["content_bias"] == "learned"):
        config["content_bias_limit"] = None  # it bounds a learned content bias only
    where = ["final_scale", "softmax_scale", "weight"]
    poison = draw(st.sampled_from([None] * 14 + [(w, v) for w in where for v in POISONS[:1]] + [("weight", "inf")]))
    return _finish(draw, "lipschitz-gpt", config, poison)


@st.composite
def mlp_examples(draw: st.DrawFn) -> Example:
    config = {
        "input_dim": draw(st.integers(2, 8)),
        "hidden": draw(st.integers(2, 8)),
        "n_layers": draw(st.integers(2, 3)),
        "num_classes": draw(st.integers(2, 4)),
        "final_scale": draw(_scale(10.0)),
        "seed": draw(st.integers(0, 2**16)),
    }
    poison = draw(st.sampled_from([None] * 8 + [("weight", value) for value in POISONS]))
    return _finish(draw, "lipschitz-mlp", config, poison)


def _finish(draw: st.DrawFn, arch: str, config: dict, poison: tuple[str, str] | None) -> Example:
    # Per parameter: 0 (a zeroed layer), or a random matrix at a norm anywhere from 0.05 to 4 times typical.
    scales = draw(st.lists(st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.0, 4.0]), min_size=40, max_size=40))
    dtype = draw(st.sampled_from(DTYPES))
    return Example(arch, config, dtype, scales, poison, draw(st.integers(0, 2**16)))


def build(example: Example) -> Checkpoint:
    """The drawn model, its weights rounded to the stored dtype, as certify sees a loaded checkpoint."""
    model = build_model(example.arch, example.config)
    gen = torch.Generator().manual_seed(example.seed)
    with torch.no_grad():
        for (name, p), scale in zip(model.named_parameters(), example.weight_scales * 4, strict=False):
            if name.startswith("embed"):  # rows of RMS up to 1.5: the domain grows beyond 1 when they do
                p.copy_(torch.randn(p.shape, generator=gen) * 0.75 * (scale > 0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scale / math.sqrt(p.shape[-1]))
        if example.poison is not None:
            where, value = example.poison
            if where == "weight":
                params = list(model.parameters())
                params[example.seed % len(params)].view(-1)[0] = float(value)
            else:
                setattr(model.config, where, float(value))
    model = model.to(example.dtype)
    return Checkpoint(model, example.arch, config_dict(model), {}, {}, 0, {}, None, {}, Path(f"<{example.arch}>"))


def check(example: Example) -> tuple[float, float] | None:
    """Certify the example; returns (measured, bound), or None when it was (rightly) refused."""
    try:
        ckpt = build(example)
        report = certify_loaded(ckpt)
    except UserError as exc:
        assert example.must_refuse, f"refused a legal model: {exc}"
        assert "\n" not in str(exc)
        return None
    assert not example.must_refuse, f"certified a model that must be refused: {example}"
    assert not math.isnan(report.log10_bound)
    model = ckpt.model  # certify_loaded left it in float64: the stored weights, exactly
    measured = model_sensitivity(model, seed=example.seed, **SEARCH).lower_bound
    bound = 10**report.log10_bound if report.log10_bound < 300 else math.inf
    assert measured <= bound * (1 + MEASUREMENT_SLACK) + MEASUREMENT_FLOOR, (measured, bound, example)
    return measured, bound


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(example=st.one_of(gpt_examples(), gpt_examples(), mlp_examples()))
def test_certified_bound_is_never_below_measured_sensitivity(example):
    torch.set_num_threads(1)
    check(example)
