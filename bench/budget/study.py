"""The Lipschitz-budget study: what each lever buys in validation accuracy per unit of log10 certified bound.

Every point is `shakespeare-cpu` trained for the steps of `shakespeare-baseline`, with every lever written out
(so a later change of the preset's defaults does not silently change a point). Each point runs train ->
certify -> activation profile (`lipcli.sweep.run_point`) and then the measured sensitivity (gradient ascent
on input pairs, `lipcli.sensitivity`), which must not exceed the point's certified bound. Finished points
live in bench/budget/points/<name>.json and are not re-run; a killed run resumes from its checkpoint.

    .venv/bin/python bench/budget/study.py                 # every point, then results.md and budget.png
    .venv/bin/python bench/budget/study.py --only lever-all # some points
    .venv/bin/python bench/budget/study.py --report        # tables and plot from the saved points only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from lipcli.files import atomic_write, strict_json
from lipcli.presets import apply_overrides, load_preset
from lipcli.sensitivity import checkpoint_sensitivity
from lipcli.sweep import Point, reference_point, run_point

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from frontier_plot import frontier_plot  # noqa: E402

HERE = Path(__file__).resolve().parent
THIRD = 1.0 / 3.0
# The paper's recipe as the first lipcli default had it: every lever at the reference architecture's value.
NAIVE = {"model.position_bias": False, "model.softmax_scale": 8.0, "model.attn_out_scale": THIRD,
         "model.mlp_gain": 1.0, "model.residual_scale": 1.0, "model.final_scale": 8.0,
         "train.sigma_max": 1.0, "train.lr": 0.1, "model.activation": "gelu", "model.bias": False,
         "train.lr_mult": {}}  # fmt: skip
# The default of session 2: position biases, content-free attention at full output scale, GeLU gain 4,
# a = 1/3, Muon lr 0.2, final_scale 9 (every block 1-Lipschitz, so the bound is <= 9).
RECIPE = {**NAIVE, "model.position_bias": True, "model.softmax_scale": 0.0, "model.attn_out_scale": 1.0,
          "model.mlp_gain": 4.0, "model.residual_scale": 2.0, "model.final_scale": 9.0, "train.lr": 0.2}  # fmt: skip
# Session 3: the MLP's activation sorts pairs of units (norm-preserving MaxMin) and biases give it thresholds;
# both leave the Lipschitz constant unchanged, so the bound stays <= 9.
SORTED = {**RECIPE, "model.activation": "groupsort", "model.group_size": 2, "model.bias": True,
          "model.mlp_gain": 1.0, "train.lr_mult": {"mlp_bias": 0.05, "head_bias": 0.25}}  # fmt: skip
POINTS: dict[str, dict] = {
    "naive": NAIVE,
    "naive-sigma1.5": {**NAIVE, "train.sigma_max": 1.5},
    "naive-sigma2": {**NAIVE, "train.sigma_max": 2.0},
    "bias": {**NAIVE, "model.position_bias": True, "model.softmax_scale": 1.0},
    "recipe": RECIPE,
    "recipe-final2": {**RECIPE, "model.final_scale": 2.0},
    "recipe-final32": {**RECIPE, "model.final_scale": 32.0},
    "sorted": SORTED,
    "sorted-final2": {**SORTED, "model.final_scale": 2.0},
    "sorted-final64": {**SORTED, "model.final_scale": 64.0},
}


def point(name: str) -> Point:
    steps = load_preset("shakespeare-baseline").train.steps
    preset = apply_overrides(load_preset("shakespeare-cpu"), {**POINTS[name], "train.steps": steps})
    return Point(name, preset)


# The fair unconstrained references (bench/baseline: RoPE, tuned lr), at shakespeare-cpu's size, data and steps.
BASELINES = {"baseline": "shakespeare-baseline", "baseline-muon": "shakespeare-baseline-muon"}


def baseline(name: str) -> Point:
    reference = reference_point(load_preset("shakespeare-cpu"), BASELINES[name])
    return Point(name, reference.preset, baseline=True)


def run(p: Point, out: Path) -> dict:
    saved = out / "points" / f"{p.name}.json"
    # run_point writes the same file when training ends; "measured" marks a point this script finished.
    row = json.loads(saved.read_text()) if saved.exists() else asdict(run_point(p, out, lambda event: None))
    if "measured" in row:
        return row
    bound = row["log10_tight"]  # None (strict JSON's inf) or inf for an unbounded baseline
    certified = bound is not None and math.isfinite(bound)
    # An unbounded model has no certified domain to search (lipcli.nn.Domain): nothing to measure against.
    row["measured"] = checkpoint_sensitivity(row["checkpoint"]) if certified else None
    if certified and math.log10(row["measured"]) > bound:
        raise RuntimeError(f"{p.name}: measured sensitivity {row['measured']:.4g} exceeds its bound 10^{bound:.3f}")
    row["levers"] = POINTS.get(p.name, {})
    atomic_write(saved, lambda tmp: tmp.write_text(strict_json(row)))
    print(json.dumps({k: row[k] for k in ("name", "val_acc", "val_loss", "log10_tight", "measured")}), flush=True)
    return row


def report(rows: list[dict], out: Path) -> None:
    rows = sorted(rows, key=lambda r: (r["log10_tight"] is None, r["log10_tight"] or 0.0))
    lines = ["| point | val acc | val loss | certified bound (tight) | measured sensitivity | bound / measured |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        bound = r["log10_tight"]
        shown = "unbounded" if bound is None else f"{10**bound:.4g}"
        ratio = "-" if bound is None else f"{10**bound / r['measured']:.3g}"
        measured = "-" if r["measured"] is None else f"{r['measured']:.4g}"
        lines.append(f"| {r['name']} | {r['val_acc']:.1%} | {r['val_loss']:.3f} | {shown} | {measured} | {ratio} |")
    atomic_write(out / "results.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))
    title = "shakespeare-cpu at the baseline's steps: accuracy per unit of certified bound"
    frontier_plot(rows, out / "budget.png", title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=[*POINTS, *BASELINES])
    parser.add_argument("--report", action="store_true", help="only rebuild results.md and budget.png")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or [*POINTS, *BASELINES]
    if not args.report:
        for name in names:
            run(baseline(name) if name in BASELINES else point(name), HERE)
    saved = [json.loads(p.read_text()) for p in sorted((HERE / "points").glob("*.json"))]
    report([row for row in saved if "measured" in row], HERE)  # not yet measured: still running elsewhere


if __name__ == "__main__":
    main()
