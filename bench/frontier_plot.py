"""Accuracy against log10 certified bound, one point per study row; unbounded rows (baselines) as dashed lines.

Only the frontier is named, in a numbered box (the points no other point beats on both accuracy and bound): with
dozens of rows, names on every point overlap into nothing readable, and every point is a row of results.md anyway.
"""

from __future__ import annotations

from pathlib import Path

from lipcli.files import atomic_write


def frontier_plot(rows: list[dict], path: Path, title: str) -> None:
    """Rows carry name, val_acc and log10_tight (None: no certificate); writes a PNG atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    certified = sorted(
        (r for r in rows if r["log10_tight"] is not None), key=lambda r: (r["log10_tight"], -r["val_acc"])
    )
    frontier, best = [], -1.0
    for r in certified:
        if r["val_acc"] > best:
            frontier.append(r)
            best = r["val_acc"]
    for r in rows:
        if r["log10_tight"] is None:
            ax.axhline(r["val_acc"], ls="--", color="gray", label=f"{r['name']} (unbounded)")
    ax.scatter([r["log10_tight"] for r in certified], [r["val_acc"] for r in certified], color="silver", s=16)
    ax.plot([r["log10_tight"] for r in frontier], [r["val_acc"] for r in frontier], "o-", color="tab:blue",
            label="frontier (numbered)")  # fmt: skip
    # Numbers on the points, names in a box: frontier neighbours sit too close for names beside them.
    for i, r in enumerate(frontier, 1):
        ax.annotate(str(i), (r["log10_tight"], r["val_acc"]), fontsize=8, textcoords="offset points", xytext=(4, -10))
    names = "\n".join(f"{i}  {r['name']}" for i, r in enumerate(frontier, 1))
    ax.text(0.99, 0.5, names, transform=ax.transAxes, fontsize=7, ha="right", va="center", multialignment="left",
            bbox={"facecolor": "white", "edgecolor": "lightgray"})  # fmt: skip
    ax.set_xlabel("log10 certified Lipschitz bound (tight)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
