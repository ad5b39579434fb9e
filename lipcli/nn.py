"""Layers that know their own Lipschitz constant and how they grow the norm of their input (Modula's idea).

Every bound is in the per-token RMS norm, max over positions (``||X|| = max_t RMS(x_t)``), for inputs
whose tokens all have RMS <= ``in_norm``. Lipschitz constants are carried as log10 so products of
hundreds of layers never overflow. Weight norms come from a ``norm_of`` function (certify passes the
exact float64 RMS->RMS norm), never from metadata. ``bound(..., tight=False)`` is the paper's
composition; ``tight=True`` the refinement derived in docs/certify.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError
from .spectral import certified_product_bound, rms_scale

# RMS->RMS operator norm of each matrix in a [..., fan_out, fan_in] tensor (certify: exact, float64).
NormOf = Callable[[Tensor], Tensor]
# max of d/dx GeLU(x) = Phi(sqrt 2) + e^-1 / sqrt(pi) = 1.128904145...: rounded UP, so that dividing by it
# makes the activation 1-Lipschitz (tests/test_soundness.py recomputes the maximum independently).
GELU_MAX_SLOPE = 1.12891
ATTENTION_OUT_FACTOR = 1.0 / 3.0  # the reference architecture's 1/3 on the attention output (the default)


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


class Linear(nn.Module):
    """Bias-free linear map whose weight belongs to a named constraint group."""

    constraint_kind = "matrix"

    def __init__(self, fan_in: int, fan_out: int, group: str, zero_init: bool = False) -> None:
        super().__init__()
        self.group = group
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


class Rotary(nn.Module):
    """RoPE: rotates query/key pairs by position; an orthogonal map per token, so norm-preserving."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(x.device))
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2)


class PositionBias(nn.Module):
    """A learned attention-logit bias per head and relative offset t - s (T5/ALiBi-style).

    It does not depend on the input, so it moves no Jacobian and adds nothing to any Lipschitz bound
    (docs/certify.md): heads can attend sharply by position while softmax_scale, which the bound pays
    for, stays small. Trained unconstrained ("free": Muon takes a row-normalized step).
    """

    constraint_kind = "free"

    def __init__(self, n_heads: int, context: int) -> None:
        super().__init__()
        self.group = "attn_pos"
        self.weight = nn.Parameter(torch.empty(n_heads, context))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """ALiBi's slopes: head h starts out favouring recent tokens at its own rate, 2^(-8(h+1)/H) per step back."""
        n_heads, context = self.weight.shape
        slopes = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float32) / n_heads)
        with torch.no_grad():
            self.weight.copy_(-slopes[:, None] * torch.arange(context, dtype=torch.float32))

    def forward(self, t: int) -> Tensor:
        """The additive causal mask [n_heads, t, t]: bias[h, i - j] where j <= i, -inf after i."""
        if t > self.weight.shape[1]:
            raise UserError(f"sequence of {t} tokens is longer than the position bias's {self.weight.shape[1]}")
        pos = torch.arange(t, device=self.weight.device)
        offset = pos[:, None] - pos[None, :]
        bias = self.weight[:, offset.clamp_min(0)]
        return bias.masked_fill(offset < 0, -math.inf)


class Attention(nn.Module):
    """Causal multi-head attention with a fixed output factor: content heads beside position heads.

    The first ``content_heads`` heads read content: logits ``softmax_scale q.k / d_head`` with RoPE on q and
    k (plus the position bias, if any). The other heads attend by position only: their pattern is the
    softmax of their position bias (uniform over the causal prefix without one), the same for every input,
    so they cost nothing in the query/key term of the bound. ``softmax_scale = 0`` makes every head a
    position head. Only content heads have q and k weights.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        softmax_scale: float,
        zero_init: bool,
        position_context: int = 0,
        out_scale: float = ATTENTION_OUT_FACTOR,
        content_heads: int | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise UserError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if content_heads is not None and not 0 <= content_heads <= n_heads:
            raise UserError(f"content_heads must lie in [0, n_heads = {n_heads}], not {content_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.softmax_scale, self.out_scale = softmax_scale, out_scale
        self.content_heads = 0 if softmax_scale == 0 else (n_heads if content_heads is None else content_heads)
        m = self.content_heads
        self.q = HeadLinear(d_model, m, self.head_dim, "attn_qk") if m else None
        self.k = HeadLinear(d_model, m, self.head_dim, "attn_qk") if m else None
        self.v = HeadLinear(d_model, n_heads, self.head_dim, "attn_v")
        self.o = Linear(d_model, d_model, "attn_out", zero_init=zero_init)
        self.rotary = Rotary(self.head_dim)
        self.position_bias = PositionBias(n_heads, position_context) if position_context else None

    @property
    def content_free(self) -> bool:
        """Attention by position only: the pattern is the same for every input."""
        return self.content_heads == 0

    def _bias(self, t: int, device: torch.device) -> Tensor:
        """The additive logit mask [n_heads, t, t]: the position bias, or 0 on the causal prefix; -inf after."""
        if self.position_bias is not None:
            return self.position_bias(t)
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        return torch.zeros(t, t, device=device).masked_fill(~causal, -math.inf).expand(self.n_heads, t, t)

    def _content_qk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The content heads' RoPE'd q (times softmax_scale / d_head) and k, [B, content_heads, T, d_head] each."""
        assert self.q is not None and self.k is not None
        # The scale is folded into q: SDPA returns NaN for a scale <= 0, a legal (if odd) model.
        return self.rotary(self.q(x)) * (self.softmax_scale / self.head_dim), self.rotary(self.k(x))

    def forward(self, x: Tensor) -> Tensor:
        m, t, parts = self.content_heads, x.shape[-2], []
        if m:
            q, k = self._content_qk(x)
        v = self.v(x)
        bias = self._bias(t, x.device).to(v.dtype)
        if m:
            if self.position_bias is None:
                parts.append(F.scaled_dot_product_attention(q, k, v[:, :m], is_causal=True, scale=1.0))
            else:
                parts.append(F.scaled_dot_product_attention(q, k, v[:, :m], attn_mask=bias[:m], scale=1.0))
        if m < self.n_heads:
            parts.append(bias[m:].softmax(dim=-1) @ v[:, m:])
        y = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.o(y.transpose(1, 2).reshape(x.shape) * self.out_scale)

    def logits(self, x: Tensor) -> Tensor:
        """The attention logits [B, H, T, T] the forward pass feeds to softmax (-inf at masked positions)."""
        m, t = self.content_heads, x.shape[-2]
        bias = self._bias(t, x.device).to(x.dtype).expand(x.shape[0], self.n_heads, t, t)
        if not m:
            return bias
        q, k = self._content_qk(x)
        return torch.cat((q @ k.mT + bias[:, :m], bias[:, m:]), dim=1)

    def bound(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> Bound:
        """Lipschitz constant and output norm on inputs whose tokens have RMS <= in_norm.

        paper: c n_o (n_v + 2 n_v r^2 n_q n_k s), output c n_o n_v r with c = |out_scale| (1/3), with n_x the
        largest per-head norm (|softmax_scale| on the query/key term only; the reference applies it to all).
        tight: per-head value path c min(sum_h ||O_h V_h||, ||O|| sqrt(sum_h ||V_h||^2)) and per-head
        query/key terms over the content heads only, combined the same way; see docs/certify.md. Both scales
        enter as absolute values: x -> s f(x) has constant |s| Lip(f).
        """
        r, s, c, m = in_norm, abs(self.softmax_scale), abs(self.out_scale), self.content_heads
        n_v = norm_of(self.v.weight)
        n_o = float(norm_of(self.o.weight))
        n_q = norm_of(self.q.weight) if self.q is not None else torch.zeros(0, dtype=n_v.dtype)
        n_k = norm_of(self.k.weight) if self.k is not None else torch.zeros(0, dtype=n_v.dtype)
        largest = {name: float(n.max()) if n.numel() else 0.0 for name, n in (("n_q", n_q), ("n_k", n_k), ("n_v", n_v))}
        terms = {**largest, "n_o": n_o, "content_heads": float(m)}
        if not tight:
            value = n_o * terms["n_v"] * c
            qk = value * 2.0 * r**2 * terms["n_q"] * terms["n_k"] * s
            return Bound(log10(value + qk), value * r, terms)
        # Spectral norms from RMS->RMS ones: a [d_head, d] slice has sigma = n / sqrt(H), a [d, d_head] one n sqrt(H).
        heads = math.sqrt(self.n_heads)
        sig_q, sig_k, sig_v = n_q / heads, n_k / heads, n_v / heads
        out_heads = self.o.weight.detach().to(n_v.dtype).view(-1, self.n_heads, self.head_dim).transpose(0, 1)
        sig_o_heads = norm_of(out_heads) * heads
        # sigma(O_h V_h) through O_h's QR factor: a [d_h, d] matrix instead of a [d, d] one, which is most of the
        # cost of certifying a large model; the product bound accounts for the QR's and the product's rounding.
        sig_ov = certified_product_bound(out_heads, self.v.weight, sig_v, lambda w: norm_of(w) * rms_scale(w))
        value = c * min(float(sig_ov.sum()), n_o * float(sig_v.pow(2).sum().sqrt()))
        # Position heads' logits do not depend on the input: only the first m (content) heads have this term.
        per_head_qk = 2.0 * s * self.n_heads * sig_q * sig_k * sig_v[:m] * r**2
        qk = c * min(float((sig_o_heads[:m] * per_head_qk).sum()), n_o * float(per_head_qk.pow(2).sum().sqrt()))
        terms.update({"value_path": value, "qk_path": qk})
        return Bound(log10(value + qk), value * r, terms)


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
        log_lip = _log10_affine(1.0 - self.a, self.a, inner.log10_lipschitz)
        out = (1.0 - self.a) * in_norm + self.a * inner.out_norm
        return Bound(log_lip, out, {**inner.terms, "inner_log10_lipschitz": inner.log10_lipschitz})


def _log10_affine(c: float, a: float, log10_x: float) -> float:
    """log10(c + a * 10**log10_x) without overflow."""
    if log10_x > 300:
        return log10(a) + log10_x + math.log10(1.0 + c / a * 10.0 ** (-log10_x))
    return log10(c + a * 10.0**log10_x)
