"""Re-measure the frontier's unconstrained references at its budget (100 steps) and redraw its files.

The sweep in this folder (see bench/RESULTS.md) ran before the fair baseline existed; its settings no
longer match today's `shakespeare-cpu`, so `lipcli sweep` cannot resume it. This trains both fair
references (`shakespeare-baseline`: AdamW; `shakespeare-baseline-muon`: Muon + AdamW) at the sweep's
shape and budget, moves the old position-blind baseline's row to history/, and rewrites results.csv,
results.json and frontier.png from every saved point.

    .venv/bin/python bench/frontier/baselines.py
"""

from __future__ import annotations

import json
from pathlib import Path

from lipcli.presets import apply_overrides, load_preset
from lipcli.sweep import Row, Skipped, SweepResult, reference_point, run_point, write_results

HERE = Path(__file__).resolve().parent
REFERENCES = ("shakespeare-baseline", "shakespeare-baseline-muon")


def main() -> None:
    pinned = json.loads((HERE / "sweep.json").read_text())
    base = apply_overrides(load_preset("shakespeare-cpu"), {"train.steps": pinned["train"]["steps"]})
    old = HERE / "points" / "shakespeare-baseline.json"
    if old.exists() and "position-blind" not in json.loads(old.read_text()).get("note", ""):
        (HERE / "history").mkdir(exist_ok=True)
        row = {**json.loads(old.read_text()), "note": "position-blind BaselineGPT (no RoPE), before the fair baseline"}
        (HERE / "history" / "shakespeare-baseline-position-blind.json").write_text(json.dumps(row, indent=1))
        old.unlink()
    for name in REFERENCES:
        if not (HERE / "points" / f"{name}.json").exists():
            point = reference_point(base, name)
            row = run_point(point, HERE, lambda event: None)
            print(f"{name}: val acc {100 * row.val_acc:.2f}% loss {row.val_loss:.3f}", flush=True)
    rows = [Row.from_dict(json.loads(p.read_text())) for p in sorted((HERE / "points").glob("*.json"))]
    previous = json.loads((HERE / "results.json").read_text())
    skipped = [Skipped(**s) for s in previous["skipped"]]
    rows.sort(key=lambda r: (r.log10_tight, r.name))
    write_results(SweepResult(HERE, rows, skipped, [], previous["notes"]))


if __name__ == "__main__":
    main()
