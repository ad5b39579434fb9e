"""Accuracy against log10 certified bound, one point per study row; unbounded rows (baselines) as dashed lines."""

from __future__ import annotations

from pathlib import Path

from lipcli.files import atomic_write


def frontier_plot(rows: list[dict], path: Path, title: str) -> None:
    """Rows carry name, val_acc and log10_tight (None: no certificate); writes a PNG atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["log10_tight"] is None:
            ax.axhline(r["val_acc"], ls="--", color="gray", label=f"{r['name']} (unbounded)")
            continue
        ax.scatter(r["log10_tight"], r["val_acc"])
        ax.annotate(r["name"], (r["log10_tight"], r["val_acc"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("log10 certified Lipschitz bound (tight)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
