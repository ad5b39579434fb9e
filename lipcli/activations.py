"""Activation profiles: where the big numbers live, and whether they fit fp8.

The paper's observation: with spectrally capped weights the largest activation entry of a GPT-2-scale
model stays near 100-160, while the unconstrained baseline passes 148,000. ``profile`` measures this on
real validation data through forward hooks, per layer and per site:

- LipschitzGPT: ``embed``; per block ``q``, ``k``, ``v`` (the per-head projections, [B, H, T, d_h]),
  ``attn_logits`` (RoPE'd q.k times softmax_scale / d_h, causal positions only), ``attn_out`` (the
  attention module's output), ``mlp_pre`` (fc_in's output), ``mlp_post`` (fc_out's input) and
  ``residual`` (the stream after the block); ``logits``.
- BaselineGPT: ``embed``; per block ``q``, ``k``, ``v`` ([B, T, d]), ``attn_logits`` (RoPE'd q.k / sqrt(d_h),
  causal positions only), ``attn_out``, ``mlp_pre``, ``mlp_post``, ``residual``; ``logits``.
- LipschitzMLP: ``layer<i>`` (each linear layer's output, before ReLU) and ``logits``.

Each site gets max |entry|, RMS and the 99.9th percentile of |entry| over ``batches`` batches, and its
max as a fraction of the largest finite fp8 e4m3, fp8 e5m2 and bf16 values. ``fp8_check`` reruns the
validation loss with every linear layer's input and weight rounded to e4m3 at per-tensor scale 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import checkpoint
from .checkpoint import Checkpoint
from .distributed import resolve_device
from .errors import UserError
from .files import atomic_write
from .nn import MLP, HeadLinear, Linear
from .training import evaluate
from .validation import checkpoint_batches

# Largest finite value of each format: a site whose max exceeds it overflows a scale-1 cast.
LIMITS: dict[str, float] = {
    "e4m3": torch.finfo(torch.float8_e4m3fn).max,
    "e5m2": torch.finfo(torch.float8_e5m2).max,
    "bf16": torch.finfo(torch.bfloat16).max,
}
QUANTILE = 0.999
QUANTILE_SAMPLE = 1_000_000  # torch.quantile refuses inputs above 2**24 entries; this many is plenty

Batch = tuple[Tensor, Tensor]


@dataclass
class SiteStats:
    """One site's statistics of |entry| over every batch."""

    site: str
    max_abs: float
    rms: float
    p999: float
    count: int  # entries seen

    @property
    def headroom(self) -> dict[str, float]:
        """max / largest finite value, per format: above 1 the site overflows it."""
        return {fmt: self.max_abs / limit for fmt, limit in LIMITS.items()}

    @property
    def exceeds(self) -> list[str]:
        return [fmt for fmt, ratio in self.headroom.items() if ratio > 1.0]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "headroom": self.headroom, "exceeds": self.exceeds}


@dataclass
class Profile:
    checkpoint: str
    arch: str
    method: str | None
    sites: list[SiteStats]
    batches: int
    samples: int  # sequences (or images) profiled
    source: str

    @property
    def peak(self) -> SiteStats:
        return max(self.sites, key=lambda s: s.max_abs)

    @property
    def max_abs(self) -> float:
        return self.peak.max_abs

    def site(self, name: str) -> SiteStats:
        return next(s for s in self.sites if s.site == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "arch": self.arch,
            "method": self.method,
            "batches": self.batches,
            "samples": self.samples,
            "source": self.source,
            "max_abs": self.max_abs,
            "peak_site": self.peak.site,
            "limits": LIMITS,
            "sites": [s.to_dict() for s in self.sites],
        }


@dataclass
class ComparisonRow:
    checkpoint: str
    arch: str
    method: str | None
    max_abs: float
    peak_site: str
    ratio: float  # max_abs / the reference's (the first profile's) max_abs


@dataclass
class Comparison:
    reference: str
    rows: list[ComparisonRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "rows": [asdict(r) for r in self.rows]}


@dataclass
class Fp8Check:
    """Validation loss and accuracy with every linear layer's input and weight rounded to e4m3 (scale 1)."""

    checkpoint: str
    val_loss: float
    val_acc: float
    fp8_val_loss: float
    fp8_val_acc: float
    layers: int  # linear layers whose input and weight were rounded
    clamped_inputs: int  # input entries beyond +-448, saturated to it
    clamped_weights: int

    @property
    def loss_change(self) -> float:
        return self.fp8_val_loss - self.val_loss

    @property
    def acc_change(self) -> float:
        return self.fp8_val_acc - self.val_acc

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss_change": self.loss_change, "acc_change": self.acc_change}


class _Site:
    """Running max, sum of squares and a uniform subsample of |entry| for one site."""

    def __init__(self, per_batch: int) -> None:
        self.per_batch = per_batch
        self.max_abs = 0.0
        self.sum_sq = 0.0
        self.count = 0
        self.rate: float | None = None
        self.samples: list[Tensor] = []

    def add(self, x: Tensor, generator: torch.Generator) -> None:
        # bf16/fp16 entries in float32 (quantile needs it); float64 ones stay exact.
        a = x.detach().abs().flatten().to(torch.promote_types(x.dtype, torch.float32))
        m = float(a.max())
        if m > 0:
            # Squares of entries scaled by the max cannot overflow float32 (bf16 activations reach 3e38).
            self.sum_sq += float((a / m).square().sum(dtype=torch.float64)) * m * m
        self.max_abs = max(self.max_abs, m)
        self.count += a.numel()
        if self.rate is None:
            # One rate for every batch (set by the first, the largest) keeps the subsample uniform.
            self.rate = min(1.0, self.per_batch / a.numel())
        k = min(a.numel(), max(1, round(a.numel() * self.rate)))
        if k < a.numel():
            a = a[torch.randint(a.numel(), (k,), generator=generator).to(a.device)]
        self.samples.append(a.cpu())

    def stats(self, name: str) -> SiteStats:
        p999 = float(torch.quantile(torch.cat(self.samples).double(), QUANTILE))
        return SiteStats(name, self.max_abs, math.sqrt(self.sum_sq / self.count), p999, self.count)


class _Recorder:
    """Collects each site's entries; ``paused`` lets a hook rerun submodules without recording them twice."""

    def __init__(self, per_batch: int, seed: int) -> None:
        self.per_batch = per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.sites: dict[str, _Site] = {}
        self.active = True

    def __call__(self, name: str, x: Tensor) -> None:
        if self.active:
            self.sites.setdefault(name, _Site(self.per_batch)).add(x, self.generator)

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.active = False
        try:
            yield
        finally:
            self.active = True


def _output(record: _Recorder, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
    return lambda module, args, out: record(name, out)


_Hook = Callable[[nn.Module, tuple, Tensor], None]


def _pre_activation(record: _Recorder, name: str, mlp: MLP) -> tuple[nn.Module, _Hook]:
    """The activation's actual input, W_in x + b_in (times GeLU's fixed gain), from the layer that makes it."""
    scale = mlp.gain if mlp.activation == "gelu" else 1.0
    return (mlp.fc_in if mlp.bias_in is None else mlp.bias_in), lambda module, args, out: record(name, scale * out)


def _input(record: _Recorder, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
    return lambda module, args, out: record(name, args[0])


def _causal(scores: Tensor) -> Tensor:
    """The entries of [..., T, T] attention logits at positions the causal mask keeps."""
    t = scores.shape[-1]
    return scores[..., torch.ones(t, t, dtype=torch.bool, device=scores.device).tril()]


def _attention(record: _Recorder, prefix: str) -> Callable[[nn.Module, tuple, Tensor], None]:
    def hook(attn: nn.Module, args: tuple, out: Tensor) -> None:
        x = args[0]
        # The module never materializes its logits (SDPA fuses them): recompute them with its own layers.
        with record.paused():
            logits = attn.logits(x)
        record(prefix + "attn_logits", _causal(logits))
        record(prefix + "attn_out", out)

    return hook


def _register(model: nn.Module, record: _Recorder) -> list[RemovableHandle]:
    """One forward hook per site the model names (``model.activation_sites()``)."""
    hooks: dict[str, Callable[[nn.Module, str], tuple[nn.Module, _Hook]]] = {
        "output": lambda module, name: (module, _output(record, name)),
        "input": lambda module, name: (module, _input(record, name)),
        "attention": lambda module, prefix: (module, _attention(record, prefix)),
        "pre_activation": lambda mlp, name: _pre_activation(record, name, mlp),
    }
    chosen = [hooks[what](module, name) for name, module, what in model.activation_sites()]
    return [module.register_forward_hook(hook) for module, hook in chosen]


def _load(ckpt: str | Path | Checkpoint, device: str) -> Checkpoint:
    """A checkpoint with its model on ``device`` (a Checkpoint passed in is moved there in place)."""
    dev = resolve_device(device)
    if isinstance(ckpt, Checkpoint):
        ckpt.model.to(dev)
        return ckpt
    return checkpoint.load(ckpt, device=dev)


def _validation(ckpt: Checkpoint, data: str | None, batches: int, batch_size: int) -> tuple[list[Batch], str]:
    """The first ``batches`` validation batches of the data the checkpoint was trained on (or ``data``)."""
    if batches < 1 or batch_size < 1:
        raise UserError(f"--batches and --batch-size must be >= 1, got {batches} and {batch_size}")
    return checkpoint_batches(ckpt, data, batch_size, batches)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def profile(
    ckpt: str | Path | Checkpoint,
    *,
    data: str | None = None,
    batches: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
) -> Profile:
    """Per-site activation statistics of ``ckpt`` over its first ``batches`` validation batches.

    ``data`` replaces the checkpoint's training corpus (or image set); ``seed`` fixes the subsample
    behind the 99.9th percentile (exact while a site's batch has at most 1e6 / batches entries).
    """
    ckpt = _load(ckpt, device)
    pairs, source = _validation(ckpt, data, batches, batch_size)
    record = _Recorder(max(1, QUANTILE_SAMPLE // len(pairs)), seed)
    model, dev = ckpt.model.eval(), _device_of(ckpt.model)
    handles = _register(model, record)
    try:
        for x, _ in pairs:
            model(x.to(dev))
    finally:
        for handle in handles:
            handle.remove()
    return Profile(
        checkpoint=str(ckpt.path),
        arch=ckpt.arch,
        method=ckpt.train_config.get("method"),
        sites=[site.stats(name) for name, site in record.sites.items()],
        batches=len(pairs),
        samples=sum(len(x) for x, _ in pairs),
        source=source,
    )


def compare(profiles: list[Profile]) -> Comparison:
    """Overall maxima side by side, each as a multiple of the first profile's."""
    if not profiles:
        raise ValueError("compare needs at least one profile")
    reference = profiles[0].max_abs
    rows = [
        ComparisonRow(
            p.checkpoint,
            p.arch,
            p.method,
            p.max_abs,
            p.peak.site,
            p.max_abs / reference if reference > 0 else math.inf,
        )
        for p in profiles
    ]
    return Comparison(profiles[0].checkpoint, rows)


def _e4m3(x: Tensor) -> tuple[Tensor, int]:
    """Round-trip through e4m3 at scale 1, saturating (CUDA casts overflow to NaN, the CPU clamps)."""
    limit = LIMITS["e4m3"]
    clamped = int((x.abs() > limit).sum())
    return x.clamp(-limit, limit).to(torch.float8_e4m3fn).to(x.dtype), clamped


class _Fp8Inputs:
    """Forward pre-hook that rounds a linear layer's input to e4m3, counting saturated entries."""

    def __init__(self) -> None:
        self.clamped = 0

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, clamped = _e4m3(args[0])
        self.clamped += clamped
        return (x, *args[1:])


@contextmanager
def _fp8_weights(layers: list[nn.Module]) -> Iterator[int]:
    """Swap every layer's weight for its e4m3 round trip; yields the saturated count, restores on exit."""
    saved = [layer.weight.detach().clone() for layer in layers]
    clamped = 0
    for layer in layers:
        rounded, n = _e4m3(layer.weight.detach())
        layer.weight.copy_(rounded)
        clamped += n
    try:
        yield clamped
    finally:
        for layer, weight in zip(layers, saved, strict=True):
            layer.weight.copy_(weight)


@torch.no_grad()
def fp8_check(
    ckpt: str | Path | Checkpoint,
    *,
    data: str | None = None,
    batches: int = 4,
    batch_size: int = 16,
    device: str = "auto",
) -> Fp8Check:
    """Validation loss and accuracy unmodified and with every linear layer's input and weight in e4m3."""
    ckpt = _load(ckpt, device)
    pairs, _ = _validation(ckpt, data, batches, batch_size)
    model, dev = ckpt.model.eval(), _device_of(ckpt.model)
    pairs = [(x.to(dev), y.to(dev)) for x, y in pairs]
    no_autocast = torch.autocast(dev.type, enabled=False)
    reference = evaluate(model, iter(pairs), no_autocast)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, Linear, HeadLinear))]
    inputs = _Fp8Inputs()
    handles = [layer.register_forward_pre_hook(inputs) for layer in layers]
    try:
        with _fp8_weights(layers) as clamped_weights:
            rounded = evaluate(model, iter(pairs), no_autocast)
    finally:
        for handle in handles:
            handle.remove()
    return Fp8Check(
        checkpoint=str(ckpt.path),
        val_loss=reference["val_loss"],
        val_acc=reference["val_acc"],
        fp8_val_loss=rounded["val_loss"],
        fp8_val_acc=rounded["val_acc"],
        layers=len(layers),
        clamped_inputs=inputs.clamped,
        clamped_weights=clamped_weights,
    )


def _merged_sites(profiles: list[Profile]) -> list[str]:
    """Every profile's sites in data order: a site new to the list goes right after its predecessor."""
    names: list[str] = []
    for p in profiles:
        at = 0
        for s in p.sites:
            if s.site in names:
                at = names.index(s.site) + 1
            else:
                names.insert(at, s.site)
                at += 1
    return names


def plot(profiles: list[Profile], path: str | Path) -> Path:
    """A PNG bar chart of max |entry| per site (log scale, one bar per checkpoint) with the fp8 limits."""
    try:
        # The object-oriented Figure draws straight to a file: no pyplot state, no display backend.
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'lipcli[plot]'") from None
    names = _merged_sites(profiles)
    width = 0.8 / len(profiles)
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) * len(profiles) + 2), 4.5))
    ax = fig.subplots()
    for j, p in enumerate(profiles):
        have = {s.site: s.max_abs for s in p.sites}
        xs = [i + j * width for i, n in enumerate(names) if n in have]
        ax.bar(xs, [have[n] for n in names if n in have], width, label=f"{Path(p.checkpoint).name} ({p.arch})")
    for fmt, style in (("e4m3", "--"), ("e5m2", ":")):
        ax.axhline(LIMITS[fmt], color="red", linestyle=style, label=f"fp8 {fmt} max {LIMITS[fmt]:g}")
    ax.set_yscale("log")
    ax.set_xticks([i + width * (len(profiles) - 1) / 2 for i in range(len(names))], names, rotation=90)
    ax.set_ylabel("max |entry|")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
