"""Layers that know their own Lipschitz constant and how they grow the norm of their input (Modula's idea).

Each certified layer has ``bound(in_norm, norm_of, tight) -> Bound`` (see :mod:`lipcli.bounds` for the norms
and the arithmetic); ``tight=False`` is the paper's composition, ``tight=True`` the refinement derived in
docs/certify.md. Each layer that owns a weight names its optimizer group, its kind and its mass role; models
list them as :class:`Declared` parameters, and :mod:`lipcli.optim` decides caps and learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bounds import Bound, NormOf, log10, log10_affine
from .errors import UserError
from .spectral import rms_scale

# max of d/dx GeLU(x) = Phi(sqrt 2) + e^-1 / sqrt(pi) = 1.128904145...: rounded UP, so that dividing by it
# makes the activation 1-Lipschitz (tests/test_soundness.py recomputes the maximum independently).
GELU_MAX_SLOPE = 1.12891


NORMS = {
    "seq-rms": "max over positions of per-token RMS (inputs and logits)",
    "l2": "L2 of the flattened input and of the logits",
}


def _round_up_decimal(x: float, digits: int = 6) -> float:
    """The smallest ``digits``-significant-digit decimal >= x, as a float >= x (round-to-nearest is monotone)."""
    exact = Decimal(x)
    quantum = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    return float((exact / quantum).to_integral_value(ROUND_CEILING) * quantum)


@dataclass(frozen=True)
class Domain:
    """The inputs a certificate covers and the norm it measures them in: what certify proves and prints,
    what sensitivity probes search and what attack projects onto. Each certified model owns one (``model.domain()``).

    ``norm`` is a key of :data:`NORMS`: "seq-rms" for an input X [T, d] (every token's RMS at most ``radius``),
    "l2" for a flattened input (``radius`` None: all of R^D).
    """

    input: str
    norm: str
    radius: float | None
    width: int  # d for token embeddings (one input is [T, d]), D for a flattened input
    max_tokens: int = 1  # the longest sequence the model takes (1 for a flattened input)

    @classmethod
    def token_embeddings(cls, width: int, radius: float, max_tokens: int) -> Domain:
        """Token embeddings [T, d], T <= max_tokens, every token of RMS <= ``radius`` rounded up to a short decimal."""
        if not (math.isfinite(radius) and radius > 0):
            raise ArithmeticError(f"token-embedding domain radius {radius!r} is not a positive number")
        what = f"token embeddings X [T x {width}], T <= {max_tokens},"
        return cls(what, "seq-rms", _round_up_decimal(radius), width, max_tokens)

    @classmethod
    def whole_space(cls, what: str, width: int) -> Domain:
        return cls(f"{what} [{width}]", "l2", None, width)

    def shape(self, tokens: int) -> tuple[int, ...]:
        """One input's shape: [T, d] with T = min(tokens, max_tokens) for token embeddings, [D] for a flat input."""
        return (min(tokens, self.max_tokens), self.width) if self.norm == "seq-rms" else (self.width,)

    def sample(self, n: int, tokens: int, generator: torch.Generator) -> Tensor:
        """``n`` float64 points of the domain: tokens on the radius sphere (or standard normal when unbounded)."""
        z = torch.randn((n, *self.shape(tokens)), generator=generator, dtype=torch.float64)
        if self.radius is None:
            return z
        return z * (self.radius / z.pow(2).mean(dim=-1, keepdim=True).sqrt())

    def statement(self) -> str:
        """The domain in words, exactly as certified."""
        if self.radius is None:
            return f"{self.input}: any input (no limit)"
        return f"{self.input} with every token's RMS <= {self.radius:.7g}"

    @property
    def norm_description(self) -> str:
        return NORMS[self.norm]

    def project(self, x: Tensor) -> Tensor:
        """The nearest point of the domain: every token longer than ``radius`` scaled back onto it."""
        if self.radius is None:
            return x
        return clip_token_rms(x, self.radius)


def certified_map(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The function a model's certificate is about: token embeddings -> logits for a language model, else the model."""
    return getattr(model, "forward_embeddings", model)


def clip_token_rms(x: Tensor, radius: float) -> Tensor:
    """Scale every token (last dimension) whose RMS exceeds ``radius`` back to ``radius``: a convex projection."""
    rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return x * (radius / rms.clamp_min(1e-300)).clamp(max=1.0)


class Declared(NamedTuple):
    """One parameter as a model declares it: its optimizer group, its kind (a key of optim.KINDS) and mass role."""

    group: str
    kind: str
    param: nn.Parameter
    mass: str | None = None  # a key of optim.MASS_ROLES (its share under train.blocks_mass); None: outside the split


class Linear(nn.Module):
    """Bias-free linear map whose weight belongs to a named constraint group (a block matrix unless told)."""

    constraint_kind = "matrix"

    def __init__(
        self, fan_in: int, fan_out: int, group: str, zero_init: bool = False, mass: str | None = "block"
    ) -> None:
        super().__init__()
        self.group, self.mass = group, mass
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.zero_init = zero_init

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Orthogonal init at RMS->RMS norm 1 (zero when the reference zero-inits this layer)."""
        with torch.no_grad():
            if self.zero_init:
                self.weight.zero_()
                return
            gaussian = torch.randn(self.weight.shape, generator=generator)
            q, _ = torch.linalg.qr(gaussian if gaussian.shape[0] >= gaussian.shape[1] else gaussian.mT)
            q = q if gaussian.shape[0] >= gaussian.shape[1] else q.mT
            self.weight.copy_(q * rms_scale(self.weight))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def bound(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> Bound:
        n = float(norm_of(self.weight))
        return Bound(log10(n), n * in_norm, {"norm": n})


class Bias(nn.Module):
    """A learned additive bias x + b: input-independent, so Lipschitz 1 (free in every bound); it adds RMS(b) to norms.

    Trained unconstrained ("free": Muon takes a normalized step), like the position biases.
    """

    constraint_kind = "free"
    mass = None

    def __init__(self, dim: int, group: str) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight

    def rms(self) -> float:
        return float(self.weight.detach().double().pow(2).mean().sqrt())


def bias_rms(bias: Bias | None) -> float:
    """RMS of an optional bias: what it can add to a token's RMS."""
    return 0.0 if bias is None else bias.rms()


class HeadLinear(nn.Module):
    """Per-head projection with weight [n_heads, head_dim, fan_in]: each head's slice is its own capped matrix.

    Capping each slice (as Modula does) rather than the stacked [d, d] matrix is what bounds every
    head's attention logits by the input norm: a stacked cap lets one head carry all the energy.
    """

    constraint_kind = "matrix"
    mass = "attention"

    def __init__(self, fan_in: int, n_heads: int, head_dim: int, group: str) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(n_heads, head_dim, fan_in))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Each head: orthonormal rows scaled to RMS->RMS norm 1."""
        with torch.no_grad():
            gaussian = torch.randn(self.weight.shape, generator=generator)
            q, _ = torch.linalg.qr(gaussian.mT)
            self.weight.copy_(q.mT * rms_scale(self.weight))

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, fan_in] -> [B, n_heads, T, head_dim]."""
        return torch.einsum("btd,hed->bhte", x, self.weight)


class Embedding(nn.Module):
    """Token embedding with rows (one per token) of RMS <= 1: the input domain of every certificate."""

    constraint_kind = "embed"
    mass = "edge"

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.group = "embed"
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            w = torch.randn(self.weight.shape, generator=generator)
            self.weight.copy_(w / w.pow(2).mean(dim=-1, keepdim=True).sqrt())

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight)

    def max_row_rms(self) -> float:
        """The largest row RMS, rounded up past float64 rounding (1e-12 relative): an upper bound."""
        w = self.weight.detach().double()
        return float(torch.linalg.vector_norm(w, dim=-1).max()) / math.sqrt(w.shape[-1]) * (1 + 1e-12)


# 1-Lipschitz activations. "groupsort" sorts each group of units (Anil et al. 2019, "Sorting out Lipschitz
# function approximation"; groups of 2 are MaxMin): a permutation at every point, so it keeps norms and
# gradient norms whole.
ACTIVATIONS = ("gelu", "groupsort")


class MLP(nn.Module):
    """W_out act(W_in x + b_in) + b_out with a 1-Lipschitz act: GeLU(g z) / (g c), c = GELU_MAX_SLOPE, or GroupSort.

    GeLU's fixed gain g sets its operating point (small inputs see an almost linear GeLU) and cancels
    in every bound, so it is free; the function class equals caps (g, 1/g) on (W_in, W_out). GroupSort
    is positively homogeneous (no gain) and keeps the norm that GeLU's 1/c and its flat side lose.
    The optional biases move each unit's threshold: free in the Lipschitz bound, counted in the output norm.
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        zero_init: bool,
        gain: float = 1.0,
        bias: bool = False,
        activation: str = "gelu",
        group_size: int = 2,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        if activation == "groupsort" and (group_size < 2 or hidden % group_size):
            raise UserError(f"groupsort needs groups of >= 2 that divide the MLP width {hidden}, not {group_size}")
        self.fc_in = Linear(d_model, hidden, "mlp_in")
        self.fc_out = Linear(hidden, d_model, "mlp_out", zero_init=zero_init)
        self.bias_in = Bias(hidden, "mlp_bias") if bias else None
        self.bias_out = Bias(d_model, "mlp_bias") if bias else None
        self.gain, self.activation, self.group_size = gain, activation, group_size
        # |act(z)| <= |z| / norm_shrink per token: GeLU's |GeLU(z)| <= |z|, GroupSort's permutation keeps norms.
        self.norm_shrink = GELU_MAX_SLOPE if activation == "gelu" else 1.0

    def pre_activation(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        return h if self.bias_in is None else self.bias_in(h)

    def activate(self, h: Tensor) -> Tensor:
        if self.activation == "groupsort":
            return h.unflatten(-1, (-1, self.group_size)).sort(dim=-1).values.flatten(-2)
        return F.gelu(self.gain * h) / (self.gain * GELU_MAX_SLOPE)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc_out(self.activate(self.pre_activation(x)))
        return y if self.bias_out is None else self.bias_out(y)

    def bound(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> Bound:
        """Lipschitz n_out n_in (activation slope <= 1, biases 0); the output RMS is at most
        n_out (n_in r + RMS(b_in)) / norm_shrink + RMS(b_out)."""
        n_in, n_out = float(norm_of(self.fc_in.weight)), float(norm_of(self.fc_out.weight))
        hidden = (n_in * in_norm + bias_rms(self.bias_in)) / self.norm_shrink
        return Bound(log10(n_in * n_out), n_out * hidden + bias_rms(self.bias_out), {"n_in": n_in, "n_out": n_out})


class Residual(nn.Module):
    """x <- (1 - a) x + a f(x): a convex combination, so L = (1 - a) + a L_f and likewise for norms."""

    def __init__(self, inner: nn.Module, a: float) -> None:
        super().__init__()
        self.inner, self.a = inner, a

    def forward(self, x: Tensor) -> Tensor:
        return (1.0 - self.a) * x + self.a * self.inner(x)

    def bound(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> Bound:
        inner = self.inner.bound(in_norm, norm_of, tight)
        log_lip = log10_affine(1.0 - self.a, self.a, inner.log10_lipschitz)
        out = (1.0 - self.a) * in_norm + self.a * inner.out_norm
        return Bound(log_lip, out, {**inner.terms, "inner_log10_lipschitz": inner.log10_lipschitz})


@dataclass(frozen=True)
class Readout:
    """Logits = scale * head(x) (+ bias): a language model's last stage, over weights the model owns.

    A fixed scale s costs |s| in the Lipschitz constant; the bias moves no Jacobian and adds RMS(b) to the output.
    Not a module, so the weights keep their checkpoint names (``head.weight``, ``logit_bias.weight``).
    """

    head: Linear
    scale: float
    bias: Bias | None

    def __call__(self, x: Tensor) -> Tensor:
        logits = self.scale * self.head(x)
        return logits if self.bias is None else self.bias(logits)

    def bound(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> Bound:
        head = self.head.bound(in_norm, norm_of, tight)
        scale = abs(self.scale)
        out = head.out_norm * scale + bias_rms(self.bias)
        return Bound(head.log10_lipschitz + log10(scale), out, head.terms)


@dataclass(frozen=True)
class DenseReLU:
    """ReLU(W x), or W x for the last layer, on flattened inputs: Lipschitz ||W||_2 in L2 (ReLU is 1-Lipschitz).

    ||W||_2 is the RMS->RMS norm times sqrt(fan_out / fan_in).
    """

    layer: Linear
    relu: bool

    def __call__(self, x: Tensor) -> Tensor:
        y = self.layer(x)
        return F.relu(y) if self.relu else y

    def bound(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> Bound:
        n = float(norm_of(self.layer.weight))
        fan_out, fan_in = self.layer.weight.shape
        gain = n * math.sqrt(fan_out / fan_in)
        return Bound(log10(gain), gain * in_norm, {"norm": n})


@dataclass(frozen=True)
class Scale:
    """x -> s x for a fixed s: Lipschitz |s| in any norm."""

    factor: float

    def __call__(self, x: Tensor) -> Tensor:
        return self.factor * x

    def bound(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> Bound:
        return Bound(log10(abs(self.factor)), abs(self.factor) * in_norm)
