"""What a sweep is made of and what it returns: its points, their result rows, and the whole result."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .constraints import METHODS, no_constraint
from .presets import Preset

# Methods that never read sigma_max (none, wd): one point each instead of one per sigma.
SIGMA_FREE_METHODS = tuple(name for name, method in METHODS.items() if method.apply is no_constraint)


@dataclass(frozen=True)
class Point:
    """One run of the sweep: a name (its file names in DIR) and the fully resolved preset it trains."""

    name: str
    preset: Preset
    baseline: bool = False

    @property
    def sigma_max(self) -> float | None:
        """The cap this point varies; None where it means nothing (the baseline, none, wd)."""
        if self.baseline or self.preset.train.method in SIGMA_FREE_METHODS:
            return None
        return self.preset.train.sigma_max


@dataclass(frozen=True)
class Row:
    """One finished run; bounds are +inf where the architecture has none (the baseline)."""

    name: str
    preset: str
    optimizer: str
    method: str
    sigma_max: float | None
    wd: float
    baseline: bool
    log10_tight: float
    log10_paper: float
    val_loss: float
    val_acc: float
    max_activation: float
    wall_s: float  # training (summed over resumes) plus certificate and activation profile
    checkpoint: str

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Row:
        # Strict JSON stores an infinite bound as null.
        unbounded = {key: math.inf for key in ("log10_tight", "log10_paper") if values[key] is None}
        return cls(**{**values, **unbounded})


COLUMNS = tuple(f.name for f in fields(Row))


@dataclass(frozen=True)
class Skipped:
    optimizer: str
    method: str
    reason: str


@dataclass(frozen=True)
class Failure:
    name: str
    error: str


@dataclass
class Grid:
    points: list[Point]
    skipped: list[Skipped]
    notes: list[str]


@dataclass
class SweepResult:
    out_dir: Path
    rows: list[Row]  # sorted by tight bound, unbounded last
    skipped: list[Skipped] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> dict[str, Path]:
        return {"csv": self.out_dir / "results.csv", "json": self.out_dir / "results.json",
                "plot": self.out_dir / "frontier.png"}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "rows": [asdict(row) for row in self.rows],
            "skipped": [asdict(s) for s in self.skipped],
            "failed": [asdict(f) for f in self.failed],
            "notes": self.notes,
            "files": {kind: str(path) for kind, path in self.files.items()},
        }
