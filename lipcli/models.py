"""The models: LipschitzGPT (the paper's), BaselineGPT (the usual pre-norm reference), LipschitzMLP.

Each config is a small JSON-serializable dataclass; ``build_model(arch, config)`` rebuilds a model
from a checkpoint's metadata. Weights are initialized deterministically from ``config.seed``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import (
    ATTENTION_OUT_FACTOR,
    MLP,
    Attention,
    Bias,
    Bound,
    Domain,
    Embedding,
    HeadLinear,
    Linear,
    NormOf,
    PositionBias,
    Residual,
    bias_rms,
    log10,
)
from .optim import Group
from .spectral import rms_norm_exact


@dataclass
class GPTConfig:
    vocab_size: int = 65
    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 4
    context: int = 256
    mlp_ratio: int = 4
    residual_scale: float = 1.0  # a = residual_scale / (2 n_layers) in x <- (1 - a) x + a f(x)
    softmax_scale: float = 1.0  # attention logits = softmax_scale * q.k / d_head
    final_scale: float = 1.0  # fixed logit multiplier: counted in the certificate
    zero_init: bool = True  # zero-init attention/MLP output projections and the head (the reference's)
    position_bias: bool = False  # learned per-head logit bias by relative offset: free in the bound
    attn_out_scale: float = ATTENTION_OUT_FACTOR  # fixed factor on the attention output: counted in the bound
    mlp_gain: float = 1.0  # GeLU operating point: W_out GeLU(g W_in x) / g; cancels in the bound
    bias: bool = False  # learned biases in the MLPs and on the logits: input-independent, free in the bound
    activation: str = "gelu"  # MLP activation, both 1-Lipschitz: "gelu" (scaled) or "groupsort" (norm-preserving)
    group_size: int = 2  # units sorted together by groupsort (2: MaxMin)
    seed: int = 0


@dataclass
class MLPConfig:
    input_dim: int = 64
    hidden: int = 256
    n_layers: int = 3
    num_classes: int = 10
    final_scale: float = 1.0
    seed: int = 0


# lipcli's layers: each initializes its own weight and names its constraint group and kind.
_OWN_WEIGHT = (Linear, HeadLinear, Embedding, PositionBias, Bias)


def _init(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, _OWN_WEIGHT):
            module.reset_parameters(generator)


def _collect_groups(
    model: nn.Module, caps: dict[str, float], sigma_max: float, lr_mult: dict[str, float]
) -> list[Group]:
    by_name: dict[str, tuple[str, list[nn.Parameter]]] = {}
    for module in model.modules():
        if isinstance(module, _OWN_WEIGHT):
            by_name.setdefault(module.group, (module.constraint_kind, []))[1].append(module.weight)
    return [
        # Embedding rows keep unit RMS unless capped by name: sigma_max bounds matrices, not the input domain.
        Group(name, params, kind, caps.get(name, 1.0 if kind == "embed" else sigma_max), lr_mult.get(name, 1.0))
        for name, (kind, params) in by_name.items()
    ]


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        a = config.residual_scale / (2 * config.n_layers)
        if not 0 < a < 1:
            raise ValueError(
                f"residual_scale / (2 n_layers) = {a:g} must lie in (0, 1): at 1 a block drops its skip path "
                f"(with zero-init outputs nothing ever trains); lower model.residual_scale below {2 * config.n_layers}"
            )
        position_context = config.context if config.position_bias else 0
        attention = Attention(
            config.d_model, config.n_heads, config.softmax_scale, config.zero_init, position_context,
            config.attn_out_scale,
        )  # fmt: skip
        self.attn = Residual(attention, a)
        mlp = MLP(
            config.d_model, config.mlp_ratio * config.d_model, config.zero_init, gain=config.mlp_gain,
            bias=config.bias, activation=config.activation, group_size=config.group_size,
        )  # fmt: skip
        self.mlp = Residual(mlp, a)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attn(x))


class LipschitzGPT(nn.Module):
    """The paper's transformer: no LayerNorm, no QK-norm, no logit softcap; convex residuals."""

    arch = "lipschitz-gpt"

    def __init__(self, config: GPTConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.head = Linear(config.d_model, config.vocab_size, "head", zero_init=config.zero_init)
        # Added after final_scale: a per-token prior that moves no Jacobian, so the bound ignores it.
        self.logit_bias = Bias(config.vocab_size, "head_bias") if config.bias else None
        if init:
            _init(self, config.seed)

    def forward_embeddings(self, x: Tensor) -> Tensor:
        """The certified map: token embeddings [B, T, d] -> logits [B, T, vocab]."""
        for block in self.blocks:
            x = block(x)
        logits = self.config.final_scale * self.head(x)
        return logits if self.logit_bias is None else self.logit_bias(logits)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_embeddings(self.embed(tokens))

    def groups(self, sigma_max: float, caps: dict[str, float], lr_mult: dict[str, float]) -> list[Group]:
        return _collect_groups(self, caps, sigma_max, lr_mult)

    def domain(self) -> Domain:
        """Token embeddings of RMS <= 1, or <= the largest stored row's RMS (rounded up) when that is larger."""
        c = self.config
        return Domain.token_embeddings(c.d_model, max(1.0, self.embed.max_row_rms()), c.context)

    def bound(self, norm_of: NormOf, tight: bool = False) -> list[tuple[str, Bound]]:
        """Per-module certificates in data order, on :meth:`domain`; final_scale enters as |final_scale|."""
        rows: list[tuple[str, Bound]] = []
        r = self.domain().radius
        assert r is not None, "a token-embedding domain is bounded"
        rows.append(("embed", Bound(0.0, r, {"radius": r})))
        for i, block in enumerate(self.blocks):
            for name, module in (("attn", block.attn), ("mlp", block.mlp)):
                b = module.bound(r, norm_of, tight)
                rows.append((f"block{i}.{name}", b))
                r = b.out_norm
        head = self.head.bound(r, norm_of, tight)
        scale = abs(self.config.final_scale)
        out = head.out_norm * scale + bias_rms(self.logit_bias)
        rows.append(("head", Bound(head.log10_lipschitz + log10(scale), out, head.terms)))
        return rows


class BaselineGPT(nn.Module):
    """The usual unconstrained reference: pre-norm RMSNorm blocks, 1/sqrt(d_head) attention, AdamW."""

    arch = "baseline-gpt"

    def __init__(self, config: GPTConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(_BaselineBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        generator = torch.Generator().manual_seed(config.seed)
        for p in self.parameters() if init else ():
            if p.dim() == 2:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)

    def forward_embeddings(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_embeddings(self.embed(tokens))

    def groups(self, sigma_max: float, caps: dict[str, float], lr_mult: dict[str, float]) -> list[Group]:
        return [Group("all", list(self.parameters()), kind="free")]


class _BaselineBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.fc_in = nn.Linear(d, config.mlp_ratio * d, bias=False)
        self.fc_out = nn.Linear(config.mlp_ratio * d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(y)
        return x + self.fc_out(F.gelu(self.fc_in(self.norm2(x))))


class LipschitzMLP(nn.Module):
    """The paper's image MLP: bias-free constrained linear layers with ReLU (1-Lipschitz)."""

    arch = "lipschitz-mlp"

    def __init__(self, config: MLPConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        dims = [config.input_dim] + [config.hidden] * (config.n_layers - 1) + [config.num_classes]
        groups = ["mlp_in"] + ["mlp_hidden"] * (config.n_layers - 2) + ["head"]
        self.layers = nn.ModuleList(Linear(i, o, g) for i, o, g in zip(dims[:-1], dims[1:], groups, strict=True))
        if init:
            _init(self, config.seed)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return self.config.final_scale * x

    def groups(self, sigma_max: float, caps: dict[str, float], lr_mult: dict[str, float]) -> list[Group]:
        return _collect_groups(self, caps, sigma_max, lr_mult)

    def domain(self) -> Domain:
        return Domain.whole_space("flattened input pixels", self.config.input_dim)

    def bound(self, norm_of: NormOf, tight: bool = False) -> list[tuple[str, Bound]]:
        """L2 -> L2: the product of spectral norms (RMS->RMS norm times sqrt(fan_out / fan_in)); ReLU is 1-Lipschitz.

        final_scale enters as |final_scale|."""
        rows = []
        for i, layer in enumerate(self.layers):
            n = float(norm_of(layer.weight))
            fan_out, fan_in = layer.weight.shape
            rows.append((f"layer{i}", Bound(log10(n * math.sqrt(fan_out / fan_in)), math.nan, {"norm": n})))
        rows.append(("final_scale", Bound(log10(abs(self.config.final_scale)), math.nan, {})))
        return rows


ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {
    LipschitzGPT.arch: (LipschitzGPT, GPTConfig),
    BaselineGPT.arch: (BaselineGPT, GPTConfig),
    LipschitzMLP.arch: (LipschitzMLP, MLPConfig),
}


def config_from_dict(arch: str, values: dict) -> GPTConfig | MLPConfig:
    """Build the config dataclass for ``arch``, rejecting unknown fields by name."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    config_cls = ARCHITECTURES[arch][1]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {arch} config field(s): {', '.join(unknown)}")
    return config_cls(**values)


def build_model(arch: str, config: GPTConfig | MLPConfig | dict, init: bool = True) -> nn.Module:
    """The model for ``arch``; ``init=False`` leaves the weights unset for a loader to fill (no init cost)."""
    if isinstance(config, dict):
        config = config_from_dict(arch, config)
    return ARCHITECTURES[arch][0](config, init=init)


def weight_matrices(model: nn.Module) -> list[Tensor]:
    """The weights a spectral constraint bounds (per head for q/k/v): no embeddings, no position biases."""
    return [m.weight for m in model.modules() if isinstance(m, (Linear, HeadLinear, nn.Linear))]


def max_weight_norm(model: nn.Module, dtype: torch.dtype = torch.float64) -> float:
    """Largest exact RMS->RMS norm over :func:`weight_matrices`, computed in ``dtype``."""
    return max((float(rms_norm_exact(w, dtype=dtype).max()) for w in weight_matrices(model)), default=0.0)


def config_dict(model: nn.Module) -> dict:
    return asdict(model.config)
