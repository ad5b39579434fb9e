"""Modula-style composition: a certified map is stages run in order, its certificate theirs composed in that order.

A stage is a callable on a batch with ``bound(in_norm, norm_of, tight) -> Bound``. :class:`Chain` runs its
child modules in registration order and certifies them in that same order, so one ``self.name = stage`` line
adds a stage to both forward and bound; nothing else restates the order. Models list their top-level stages
once (``model.stages()``) and run and certify that one list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, cast

from torch import Tensor, nn

from .bounds import Bound, NormOf, add_log10

Row = tuple[str, Bound]


class Stage(Protocol):
    def __call__(self, x: Tensor) -> Tensor: ...

    def bound(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> Bound: ...


def run(stages: Iterable[tuple[str, Stage]], x: Tensor) -> Tensor:
    """The stages' forward pass, in order."""
    for _, stage in stages:
        x = stage(x)
    return x


def stage_rows(stages: Iterable[tuple[str, Stage]], in_norm: float, norm_of: NormOf, tight: bool = False) -> list[Row]:
    """Each stage's certificate on the previous one's output-norm bound, in order; a chain's stages are name.child."""
    rows: list[Row] = []
    for name, stage in stages:
        if isinstance(stage, Chain):
            new = [(f"{name}.{child}", b) for child, b in stage.rows(in_norm, norm_of, tight)]
        elif hasattr(stage, "bound"):
            new = [(name, stage.bound(in_norm, norm_of, tight))]
        else:  # skipping it would certify a map that forward does not compute
            raise TypeError(f"stage {name} ({type(stage).__name__}) has no bound: the model cannot be certified")
        rows += new
        in_norm = new[-1][1].out_norm if new else in_norm
    return rows


def compose(rows: list[Row], in_norm: float) -> Bound:
    """The certificate of stages run one after another: Lipschitz constants multiply, the last output bound holds."""
    total = 0.0
    for _, row in rows:
        total = add_log10(total, row.log10_lipschitz)
    out_norm = rows[-1][1].out_norm if rows else in_norm
    return Bound(total, out_norm, {f"{name}.log10_lipschitz": row.log10_lipschitz for name, row in rows})


class Chain(nn.Module):
    """Child modules (each a :class:`Stage`) run in registration order; :meth:`bound` composes them in that order."""

    def stages(self) -> list[tuple[str, Stage]]:
        return [(name, cast(Stage, child)) for name, child in self.named_children()]

    def forward(self, x: Tensor) -> Tensor:
        return run(self.stages(), x)

    def rows(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> list[Row]:
        return stage_rows(self.stages(), in_norm, norm_of, tight)

    def bound(self, in_norm: float, norm_of: NormOf, tight: bool = False) -> Bound:
        return compose(self.rows(in_norm, norm_of, tight), in_norm)
