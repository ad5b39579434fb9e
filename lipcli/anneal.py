"""Scale annealing: train at larger fixed scales, which escape a task's plateau, and end at the model's own.

A fixed scale (softmax_scale, final_scale, attn_out_scale) multiplies into the certified bound, and below some
size a model no longer learns a task at all (bench/recall/results.md: recall stays at the no-recall plateau at
softmax_scale 4 or final_scale 5). ``train.anneal_from`` starts those scales higher and moves them linearly to
the model's values between ``train.anneal_start`` and ``train.anneal_end``; the steps after that train at the
model's values, which are what the final checkpoint records and certify bounds. Every checkpoint records the
scales its weights were used with, so an intermediate one certifies what it holds.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .models import validate_config
from .presets import PresetError, TrainConfig


def targets(model: nn.Module, t: TrainConfig) -> dict[str, float]:
    """The model's values of the scales ``t`` anneals (PresetError for a scale the model does not have)."""
    if not t.anneal_from:
        return {}
    known = getattr(model, "fixed_scales", dict)()
    unknown = sorted(set(t.anneal_from) - set(known))
    if unknown:
        have = ", ".join(sorted(known)) or "none"
        raise PresetError(f"train.anneal_from names {', '.join(unknown)}; this model's annealable scales: {have}")
    return {name: known[name] for name in t.anneal_from}


def check(model: nn.Module, t: TrainConfig, arch: str) -> None:
    """Refuse an anneal that names no scale of the model, ends too late or starts at an illegal value."""
    targets(model, t)
    if not t.anneal_from:
        return
    if not t.anneal_start <= t.anneal_end < t.steps:
        raise PresetError(
            f"train.anneal_start ({t.anneal_start}) <= train.anneal_end ({t.anneal_end}) < train.steps ({t.steps}) "
            "must hold, so that the last steps train at the model's own scales: set --set train.anneal_start=... "
            "--set train.anneal_end=... to fit the run"
        )
    if t.compile:
        raise PresetError("train.anneal_from changes the model's scales every step, which torch.compile recompiles: "
                          "train without --compile")  # fmt: skip
    start = replace(model.config, **t.anneal_from)  # type: ignore[arg-type]
    try:
        validate_config(arch, start)
    except ValueError as exc:
        raise PresetError(f"train.anneal_from: {exc}") from None


def scales_at(step: int, t: TrainConfig, final: dict[str, float]) -> dict[str, float]:
    """The annealed scales for optimizer step ``step`` (0-based): ``anneal_from`` until anneal_start, then linear."""
    if step >= t.anneal_end:
        return dict(final)
    if step < t.anneal_start:
        return dict(t.anneal_from)
    progress = (step - t.anneal_start) / (t.anneal_end - t.anneal_start)
    return {name: start + (final[name] - start) * progress for name, start in t.anneal_from.items()}
