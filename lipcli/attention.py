"""Causal multi-head attention with a certified bound: content heads (RoPE'd q.k) beside position heads.

Its own module because its bound (the paper's and the tight per-head one, docs/certify.md) is most of
what certify computes; the layers it is built from live in :mod:`lipcli.nn`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bounds import Bound, NormOf, log10
from .errors import UserError
from .nn import HeadLinear, Linear
from .spectral import certified_product_bound, rms_scale

ATTENTION_OUT_FACTOR = 1.0 / 3.0  # the reference architecture's 1/3 on the attention output (the default)
# How content heads see position besides RoPE: the position heads' learned bias, ALiBi's fixed slopes, or nothing.
CONTENT_BIASES = ("learned", "alibi", "none")


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's (Press et al. 2022) slope per head: head h favours recent tokens at 2^(-8(h+1)/H) per step back."""
    return 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float32) / n_heads)


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
    """A learned attention-logit bias per head and relative offset t - s (T5/ALiBi-style), for heads
    ``first_head`` to ``n_heads - 1``.

    It does not depend on the input, so it moves no Jacobian and adds nothing to any Lipschitz bound
    (docs/certify.md): heads can attend sharply by position while softmax_scale, which the bound pays
    for, stays small. Trained unconstrained ("free": Muon takes a row-normalized step).
    """

    constraint_kind = "free"
    mass = None

    def __init__(
        self, n_heads: int, context: int, first_head: int = 0, limit: float | None = None, limited_heads: int = 0
    ) -> None:
        super().__init__()
        self.group = "attn_pos"
        self.n_heads, self.first_head = n_heads, first_head
        self.limit, self.limited_heads = limit, limited_heads
        self.weight = nn.Parameter(torch.empty(n_heads - first_head, context))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """ALiBi's slopes: each head starts out favouring recent tokens at its own rate (:func:`alibi_slopes`)."""
        slopes = alibi_slopes(self.n_heads)[self.first_head :]
        with torch.no_grad():
            self.weight.copy_(-slopes[:, None] * torch.arange(self.weight.shape[1], dtype=torch.float32))

    def forward(self, offset: Tensor) -> Tensor:
        """bias[h, offset] for a [t, t] matrix of offsets t - s >= 0: [heads, t, t]."""
        if offset.shape[-1] > self.weight.shape[1]:
            raise UserError(
                f"sequence of {offset.shape[-1]} tokens is longer than the position bias's {self.weight.shape[1]}"
            )
        return self.values()[:, offset]

    def values(self) -> Tensor:
        """The bias per head and offset, [heads, context]: the first ``limited_heads`` rows as
        ``limit tanh(w / limit)``, within [-limit, limit] whatever training does; the rest as stored."""
        k, limit = self.limited_heads, self.limit
        if limit is None or not k:
            return self.weight
        return torch.cat((limit * torch.tanh(self.weight[:k] / limit), self.weight[k:]))


class Attention(nn.Module):
    """Causal multi-head attention with a fixed output factor: content heads beside position heads.

    The first ``content_heads`` heads read content: logits ``softmax_scale q.k / d_head`` with RoPE on q and
    k, plus their position bias (``content_bias``: the learned one the position heads have, within
    ``+-content_bias_limit`` when that is set, ALiBi's fixed slopes, or none). The other heads attend by
    position only: their pattern is the softmax of their learned position bias (uniform over the causal prefix
    without one), the same for every input, so they cost nothing in the query/key term of the bound.
    ``softmax_scale = 0`` makes every head a position head. Only content heads have q and k weights.
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
        content_bias: str = "learned",
        content_bias_limit: float | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise UserError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if content_heads is not None and not 0 <= content_heads <= n_heads:
            raise UserError(f"content_heads must lie in [0, n_heads = {n_heads}], not {content_heads}")
        if content_bias not in CONTENT_BIASES:
            raise UserError(f"content_bias must be one of {', '.join(CONTENT_BIASES)}, not {content_bias!r}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.softmax_scale, self.out_scale = softmax_scale, out_scale
        self.content_heads = 0 if softmax_scale == 0 else (n_heads if content_heads is None else content_heads)
        m = self.content_heads
        self.q = HeadLinear(d_model, m, self.head_dim, "attn_qk") if m else None
        self.k = HeadLinear(d_model, m, self.head_dim, "attn_qk") if m else None
        self.v = HeadLinear(d_model, n_heads, self.head_dim, "attn_v")
        self.o = Linear(d_model, d_model, "attn_out", zero_init=zero_init)
        self.rotary = Rotary(self.head_dim)
        # A learned bias can outgrow any content logit the bound affords (bench/content): content heads may opt out.
        learned_from = 0 if content_bias == "learned" else m
        learns = position_context and learned_from < n_heads
        limited = m if learned_from == 0 else 0
        self.position_bias = (
            PositionBias(n_heads, position_context, learned_from, content_bias_limit, limited) if learns else None
        )
        self.content_bias = content_bias if m else "none"
        self.register_buffer("content_slopes", alibi_slopes(n_heads)[:m], persistent=False)

    @property
    def content_free(self) -> bool:
        """Attention by position only: the pattern is the same for every input."""
        return self.content_heads == 0

    def _bias(self, t: int, device: torch.device) -> Tensor:
        """The additive logit mask [n_heads, t, t]: each head's position bias (0 where it has none); -inf after t."""
        pos = torch.arange(t, device=device)
        offset = pos[:, None] - pos[None, :]
        past = offset.clamp_min(0)
        dtype = self.content_slopes.dtype
        learned = self.position_bias(past) if self.position_bias is not None else torch.zeros(0, t, t, device=device)
        fixed = torch.zeros(self.n_heads - learned.shape[0], t, t, device=device, dtype=dtype)
        if self.content_bias == "alibi":
            fixed[: self.content_heads] = -self.content_slopes[:, None, None] * past
        return torch.cat((fixed, learned.to(dtype))).masked_fill(offset < 0, -math.inf)

    def _causal_only(self) -> bool:
        """The content heads' logits are q.k alone, so SDPA's causal kernel applies."""
        return self.content_bias == "none" or (self.content_bias == "learned" and self.position_bias is None)

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
            if self._causal_only():
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
