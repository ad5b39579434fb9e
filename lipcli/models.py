"""The models: LipschitzGPT (the paper's), BaselineGPT (the usual pre-norm reference), LipschitzMLP.

Each config is a small JSON-serializable dataclass; ``build_model(arch, config)`` rebuilds a model
from a checkpoint's metadata. Weights are initialized deterministically from ``config.seed``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import ATTENTION_OUT_FACTOR, CONTENT_BIASES, Attention, PositionBias, Rotary
from .bounds import Bound, NormOf
from .compose import Chain, Stage, run, stage_rows
from .errors import UserError
from .nn import (
    ACTIVATIONS,
    MLP,
    Bias,
    Declared,
    DenseReLU,
    Domain,
    Embedding,
    HeadLinear,
    Linear,
    Readout,
    Residual,
    Scale,
)
from .spectral import rms_norm_exact

# What a model class reads (its input_kind): token ids, or flattened images. Tasks, validation and attack key on it.
TOKENS, IMAGES = "tokens", "images"


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
    content_heads: int | None = None  # heads per layer that read content (None: all); the rest attend by position
    content_layers: int | None = None  # the last N layers have content heads (None: all); earlier ones, position only
    final_scale: float = 1.0  # fixed logit multiplier: counted in the certificate
    zero_init: bool = True  # zero-init attention/MLP output projections and the head (the reference's)
    position_bias: bool = False  # learned per-head logit bias by relative offset: free in the bound
    content_bias: str = "learned"  # the content heads' position bias: "learned", "alibi" (fixed slopes) or "none"
    content_bias_limit: float | None = None  # a learned content bias stays within +-this (None: unbounded)
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


# Fixed scales beyond this multiply activations toward float32's range (and far past fp16's) and buy nothing:
# the bound grows with them.
MAX_SCALE = 1e6
# Smallest |mlp_gain|: below, the float32 forward rounds the gain to 0, and GeLU(0 z) / 0 is NaN.
MIN_SCALE = 1e-6
_MIN_INT = {"vocab_size": 1, "d_model": 1, "n_layers": 1, "n_heads": 1, "context": 1, "mlp_ratio": 1, "group_size": 2,
            "input_dim": 1, "hidden": 1, "num_classes": 1}  # fmt: skip
_MLP_MIN_LAYERS = 2  # an input layer and a head
_SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


def validate_config(arch: str, config: GPTConfig | MLPConfig) -> None:
    """Reject a field of the wrong type, a non-finite or out-of-range value, or a configuration whose
    forward pass is not finite, with a message naming the field (``model.<name>``)."""
    for f in fields(config):
        _check_type(f.name, f.type, getattr(config, f.name))
    for name, least in _MIN_INT.items():
        value = getattr(config, name, None)
        if value is not None and value < least:
            raise UserError(f"model.{name} must be an integer >= {least} (got {value})")
    if not _SEED_RANGE[0] <= config.seed < _SEED_RANGE[1]:
        raise UserError(f"model.seed must lie in [-2**63, 2**64) (got {config.seed})")
    if abs(config.final_scale) > MAX_SCALE:
        raise UserError(f"model.final_scale must lie in [-{MAX_SCALE:g}, {MAX_SCALE:g}] (got {config.final_scale:g})")
    if isinstance(config, MLPConfig):
        if config.n_layers < _MLP_MIN_LAYERS:
            raise UserError(f"model.n_layers must be >= {_MLP_MIN_LAYERS} for {arch} (got {config.n_layers})")
        return
    if config.d_model % config.n_heads:
        raise UserError(f"model.n_heads ({config.n_heads}) must divide model.d_model ({config.d_model})")
    if arch == LipschitzGPT.arch:
        _check_lipschitz_gpt(config)


def _check_type(name: str, kind: str, value: object) -> None:
    # Field types are strings under `from __future__ import annotations`; bool is an int, so it is ruled out.
    if kind.endswith(" | None"):
        if value is None:
            return
        kind = kind.removesuffix(" | None")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int" and not (is_number and isinstance(value, int)):
        raise UserError(f"model.{name} must be an integer (got {value!r})")
    # An int past float's range (10**400) is as infinite as inf; the comparison never overflows.
    if kind == "float" and not (is_number and abs(value) <= sys.float_info.max):
        raise UserError(f"model.{name} must be a finite number (got {value!r})")
    if kind == "bool" and not isinstance(value, bool):
        raise UserError(f"model.{name} must be true or false (got {value!r})")
    if kind == "str" and not isinstance(value, str):
        raise UserError(f"model.{name} must be a string (got {value!r})")


def _check_lipschitz_gpt(config: GPTConfig) -> None:
    """The ranges LipschitzGPT's blocks and its certificate rely on (BaselineGPT ignores these fields)."""
    head_dim = config.d_model // config.n_heads
    if head_dim % 2:
        raise UserError(
            f"model.d_model / model.n_heads = {head_dim} must be even: rotary embeddings rotate pairs of dimensions"
        )
    most = 2 * config.n_layers
    if not 0 < config.residual_scale < most:
        raise UserError(
            f"model.residual_scale must lie in (0, 2 n_layers = {most}) (got {config.residual_scale:g}): "
            "a = residual_scale / (2 n_layers) mixes each block into its skip path, and at a >= 1 the skip is gone"
        )
    if config.activation not in ACTIVATIONS:
        raise UserError(f"model.activation must be one of {', '.join(ACTIVATIONS)} (got {config.activation!r})")
    if config.content_bias not in CONTENT_BIASES:
        raise UserError(f"model.content_bias must be one of {', '.join(CONTENT_BIASES)} (got {config.content_bias!r})")
    limit = config.content_bias_limit
    if limit is not None:
        if not (config.position_bias and config.content_bias == "learned"):
            raise UserError(
                "model.content_bias_limit bounds a learned content bias: it needs model.position_bias = true and "
                f'model.content_bias = "learned" (got {str(config.position_bias).lower()} and {config.content_bias!r})'
            )
        if not 0 < limit <= MAX_SCALE:
            raise UserError(f"model.content_bias_limit must lie in (0, {MAX_SCALE:g}] (got {limit:g})")
    hidden = config.mlp_ratio * config.d_model
    if config.activation == "groupsort" and hidden % config.group_size:
        raise UserError(f"model.group_size ({config.group_size}) must divide the MLP width {hidden}")
    if config.activation == "gelu" and not MIN_SCALE <= abs(config.mlp_gain) <= MAX_SCALE:
        raise UserError(
            f"model.mlp_gain must have magnitude in [{MIN_SCALE:g}, {MAX_SCALE:g}] (got {config.mlp_gain:g}): "
            "GeLU(g z) / g is 0/0 when g rounds to 0"
        )
    if abs(config.attn_out_scale) > MAX_SCALE:
        raise UserError(
            f"model.attn_out_scale must lie in [-{MAX_SCALE:g}, {MAX_SCALE:g}] (got {config.attn_out_scale:g})"
        )
    s = config.softmax_scale
    if abs(s) > MAX_SCALE:
        raise UserError(f"model.softmax_scale must lie in [-{MAX_SCALE:g}, {MAX_SCALE:g}] (got {s:g})")
    heads = config.content_heads
    if heads is not None and not 0 <= heads <= config.n_heads:
        raise UserError(f"model.content_heads must lie in [0, model.n_heads = {config.n_heads}] (got {heads})")
    layers = config.content_layers
    if layers is not None and not 0 <= layers <= config.n_layers:
        raise UserError(f"model.content_layers must lie in [0, model.n_layers = {config.n_layers}] (got {layers})")


# lipcli's layers: each initializes its own weight and names its constraint group, kind and mass role.
_OWN_WEIGHT = (Linear, HeadLinear, Embedding, PositionBias, Bias)


def _init(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, _OWN_WEIGHT):
            module.reset_parameters(generator)


def _declared(model: nn.Module) -> list[Declared]:
    """Every weight of lipcli's layers, in module order, as its layer names it."""
    return [
        Declared(m.group, m.constraint_kind, m.weight, m.mass) for m in model.modules() if isinstance(m, _OWN_WEIGHT)
    ]


class Block(Chain):
    """Attention then MLP, each in a convex residual: the stages run (and are certified) in registration order."""

    def __init__(self, config: GPTConfig, reads_content: bool = True) -> None:
        super().__init__()
        a = config.residual_scale / (2 * config.n_layers)
        if not 0 < a < 1:
            raise UserError(
                f"residual_scale / (2 n_layers) = {a:g} must lie in (0, 1): at 1 a block drops its skip path "
                f"(with zero-init outputs nothing ever trains); lower model.residual_scale below {2 * config.n_layers}"
            )
        position_context = config.context if config.position_bias else 0
        attention = Attention(
            config.d_model, config.n_heads, config.softmax_scale, config.zero_init, position_context,
            config.attn_out_scale, config.content_heads if reads_content else 0, config.content_bias,
            config.content_bias_limit,
        )  # fmt: skip
        self.attn = Residual(attention, a)
        mlp = MLP(
            config.d_model, config.mlp_ratio * config.d_model, config.zero_init, gain=config.mlp_gain,
            bias=config.bias, activation=config.activation, group_size=config.group_size,
        )  # fmt: skip
        self.mlp = Residual(mlp, a)


class LipschitzGPT(nn.Module):
    """The paper's transformer: no LayerNorm, no QK-norm, no logit softcap; convex residuals."""

    arch = "lipschitz-gpt"
    input_kind = TOKENS

    def __init__(self, config: GPTConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.d_model)
        # Early layers can gather by position (e.g. "the previous token") for free; content lookups come last.
        plain = 0 if config.content_layers is None else config.n_layers - config.content_layers
        self.blocks = nn.ModuleList(Block(config, reads_content=i >= plain) for i in range(config.n_layers))
        self.head = Linear(config.d_model, config.vocab_size, "head", zero_init=config.zero_init, mass="edge")
        # Added after final_scale: a per-token prior that moves no Jacobian, so the bound ignores it.
        self.logit_bias = Bias(config.vocab_size, "head_bias") if config.bias else None
        if init:
            _init(self, config.seed)

    def stages(self) -> list[tuple[str, Stage]]:
        """The certified map's stages in data order: what forward_embeddings runs and bound composes."""
        readout = Readout(self.head, self.config.final_scale, self.logit_bias)
        return [*((f"block{i}", block) for i, block in enumerate(self.blocks)), ("head", readout)]

    def forward_embeddings(self, x: Tensor) -> Tensor:
        """The certified map: token embeddings [B, T, d] -> logits [B, T, vocab]."""
        return run(self.stages(), x)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_embeddings(self.embed(tokens))

    def declared_parameters(self) -> list[Declared]:
        return _declared(self)

    def activation_sites(self) -> list[tuple[str, nn.Module, str]]:
        """(site, module, what to record) for lipcli.activations, in data order; position-only heads have no q/k."""
        sites = [("embed", self.embed, "output")]
        for i, block in enumerate(self.blocks):
            p, attn, mlp = f"block{i}.", block.attn.inner, block.mlp.inner
            sites += [(p + n, getattr(attn, n), "output") for n in ("q", "k", "v") if getattr(attn, n)]
            sites += [(p, attn, "attention"), (p + "mlp_pre", mlp, "pre_activation")]
            sites += [(p + "mlp_post", mlp.fc_out, "input"), (p + "residual", block, "output")]
        return [*sites, ("logits", self, "output")]

    def fixed_scales(self) -> dict[str, float]:
        """The fixed scales the bound counts and training may anneal (train.anneal_from), with their values;
        softmax_scale only where some head reads content."""
        c = self.config
        scales = {"final_scale": c.final_scale, "attn_out_scale": c.attn_out_scale}
        if any(block.attn.inner.content_heads for block in self.blocks):
            scales["softmax_scale"] = c.softmax_scale
        return scales

    def set_fixed_scales(self, values: dict[str, float]) -> None:
        """Set scales named by :meth:`fixed_scales`; the config follows, so a checkpoint records the values in use."""
        self.config = replace(self.config, **values)
        for block in self.blocks:
            block.attn.inner.softmax_scale = self.config.softmax_scale
            block.attn.inner.out_scale = self.config.attn_out_scale

    def domain(self) -> Domain:
        """Token embeddings of RMS <= 1, or <= the largest stored row's RMS (rounded up) when that is larger."""
        c = self.config
        return Domain.token_embeddings(c.d_model, max(1.0, self.embed.max_row_rms()), c.context)

    def bound(self, norm_of: NormOf, tight: bool = False) -> list[tuple[str, Bound]]:
        """Per-stage certificates in data order on :meth:`domain`, after the domain's own row ("embed")."""
        r = self.domain().radius
        assert r is not None, "a token-embedding domain is bounded"
        return [("embed", Bound(0.0, r, {"radius": r})), *stage_rows(self.stages(), r, norm_of, tight)]


class BaselineGPT(nn.Module):
    """The unconstrained reference a practitioner would pick at this size: nanoGPT's pre-norm block with RoPE.

    RMSNorm before attention and MLP and on the head's input, rotary positions on q and k, GELU MLP, untied
    head, GPT-2 initialization (N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)).
    """

    arch = "baseline-gpt"
    input_kind = TOKENS
    unbounded_reason = "RMSNorm rescales small inputs without limit: no global Lipschitz bound"

    def __init__(self, config: GPTConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(_BaselineBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        if init:
            self._init(torch.Generator().manual_seed(config.seed))

    @torch.no_grad()
    def _init(self, generator: torch.Generator) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = residual_std if name.endswith(("attn.o.weight", "fc_out.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    def forward_embeddings(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_embeddings(self.embed(tokens))

    def declared_parameters(self) -> list[Declared]:
        """Hidden matrices (Muon's under muon-adamw), embedding and head (AdamW's, decayed), norm gains (no decay).

        Only embedding and head take a share of blocks_mass: the hidden group mixes every block matrix."""
        return [
            *(Declared("hidden", "matrix", p) for p in self.blocks.parameters() if p.dim() == 2),
            Declared("embed", "edge", self.embed.weight, "edge"),
            Declared("head", "edge", self.head.weight, "edge"),
            *(Declared("norm", "gain", p) for p in self.parameters() if p.dim() == 1),
        ]

    def activation_sites(self) -> list[tuple[str, nn.Module, str]]:
        """(site, module, what to record) for lipcli.activations, in data order."""
        sites = [("embed", self.embed, "output")]
        for i, block in enumerate(self.blocks):
            p, attn = f"block{i}.", block.attn
            sites += [(p + n, getattr(attn, n), "output") for n in ("q", "k", "v")]
            sites += [(p, attn, "attention"), (p + "mlp_pre", block.fc_in, "output")]
            sites += [(p + "mlp_post", block.fc_out, "input"), (p + "residual", block, "output")]
        return [*sites, ("logits", self, "output")]


class _BaselineAttention(nn.Module):
    """Causal multi-head attention with RoPE on q and k and 1/sqrt(d_head) logits (SDPA's default)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.d_model
        if d % config.n_heads:
            raise UserError(f"d_model {d} is not divisible by n_heads {config.n_heads}")
        self.n_heads, self.head_dim = config.n_heads, d // config.n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.rotary = Rotary(self.head_dim)

    def _heads(self, z: Tensor) -> Tensor:
        b, t, _ = z.shape
        return z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k = self.rotary(self._heads(self.q(x))), self.rotary(self._heads(self.k(x)))
        y = F.scaled_dot_product_attention(q, k, self._heads(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(x.shape))

    def logits(self, x: Tensor) -> Tensor:
        """The attention logits [B, H, T, T] the forward pass feeds to softmax (-inf at masked positions)."""
        q, k = self.rotary(self._heads(self.q(x))), self.rotary(self._heads(self.k(x)))
        scores = q @ k.mT / math.sqrt(self.head_dim)
        t = x.shape[-2]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, -math.inf)


class _BaselineBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = _BaselineAttention(config)
        self.fc_in = nn.Linear(d, config.mlp_ratio * d, bias=False)
        self.fc_out = nn.Linear(config.mlp_ratio * d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.norm2(x))))


class LipschitzMLP(nn.Module):
    """The paper's image MLP: bias-free constrained linear layers with ReLU (1-Lipschitz)."""

    arch = "lipschitz-mlp"
    input_kind = IMAGES

    def __init__(self, config: MLPConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        dims = [config.input_dim] + [config.hidden] * (config.n_layers - 1) + [config.num_classes]
        groups = ["mlp_in"] + ["mlp_hidden"] * (config.n_layers - 2) + ["head"]
        # The split as it was by group name: mlp_in (a GPT name) shares the block role, mlp_hidden (none) is outside.
        masses = ["block"] + [None] * (config.n_layers - 2) + ["edge"]
        self.layers = nn.ModuleList(
            Linear(i, o, g, mass=m) for i, o, g, m in zip(dims[:-1], dims[1:], groups, masses, strict=True)
        )
        if init:
            _init(self, config.seed)

    def stages(self) -> list[tuple[str, Stage]]:
        """What forward runs and bound composes, in order: ReLU after every layer but the last, then final_scale."""
        last = len(self.layers) - 1
        layers = [(f"layer{i}", DenseReLU(layer, relu=i < last)) for i, layer in enumerate(self.layers)]
        return [*layers, ("final_scale", Scale(self.config.final_scale))]

    def forward(self, x: Tensor) -> Tensor:
        return run(self.stages(), x.flatten(1))

    def declared_parameters(self) -> list[Declared]:
        return _declared(self)

    def activation_sites(self) -> list[tuple[str, nn.Module, str]]:
        """(site, module, what to record) for lipcli.activations: each layer's output, before ReLU."""
        return [*((f"layer{i}", layer, "output") for i, layer in enumerate(self.layers)), ("logits", self, "output")]

    def domain(self) -> Domain:
        return Domain.whole_space("flattened input pixels", self.config.input_dim)

    def bound(self, norm_of: NormOf, tight: bool = False) -> list[tuple[str, Bound]]:
        """L2 -> L2 per stage; the domain is all of R^D, so no output-norm bound (NaN)."""
        return stage_rows(self.stages(), math.nan, norm_of, tight)


ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {
    LipschitzGPT.arch: (LipschitzGPT, GPTConfig),
    BaselineGPT.arch: (BaselineGPT, GPTConfig),
    LipschitzMLP.arch: (LipschitzMLP, MLPConfig),
}


# The ModuleList of each architecture whose length is model.n_layers, named by its state-dict prefix.
LAYER_LISTS = {LipschitzGPT.arch: "blocks", BaselineGPT.arch: "blocks", LipschitzMLP.arch: "layers"}


def model_class(arch: str) -> type[nn.Module]:
    """The class registered for ``arch``, refused by name when there is none."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch][0]


def config_from_dict(arch: str, values: dict) -> GPTConfig | MLPConfig:
    """Build the config dataclass for ``arch``, rejecting unknown fields and invalid values by name."""
    model_class(arch)  # an unknown arch is refused by name
    config_cls = ARCHITECTURES[arch][1]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown {arch} config field(s): {', '.join(unknown)}")
    config = config_cls(**values)
    validate_config(arch, config)
    return config


def build_model(arch: str, config: GPTConfig | MLPConfig | dict, init: bool = True) -> nn.Module:
    """The model for ``arch``; ``init=False`` leaves the weights unset for a loader to fill (no init cost)."""
    if isinstance(config, dict):
        config = config_from_dict(arch, config)
    else:
        validate_config(arch, config)
    return ARCHITECTURES[arch][0](config, init=init)


def weight_matrices(model: nn.Module) -> list[Tensor]:
    """The weights a spectral constraint bounds (per head for q/k/v): no embeddings, no position biases."""
    return [m.weight for m in model.modules() if isinstance(m, (Linear, HeadLinear, nn.Linear))]


def max_weight_norm(model: nn.Module, dtype: torch.dtype = torch.float64) -> float:
    """Largest exact RMS->RMS norm over :func:`weight_matrices`, computed in ``dtype``."""
    return max((float(rms_norm_exact(w, dtype=dtype).max()) for w in weight_matrices(model)), default=0.0)


def config_dict(model: nn.Module) -> dict:
    return asdict(model.config)
