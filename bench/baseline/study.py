"""The fair unconstrained reference: a learning-rate / warm-up sweep of BaselineGPT (RoPE, pre-norm, GPT-2 init).

Two recipes at the size, data and steps of `shakespeare-cpu`: AdamW on everything (`shakespeare-baseline`),
and modded-nanogpt's split, Muon on the hidden matrices and AdamW on embedding, head and gains
(`shakespeare-baseline-muon`). Each point trains, then is certified (unbounded) and activation-profiled
(`lipcli.sweep.run_point`). Finished points live in bench/baseline/points/<name>.json and are not re-run;
a killed point resumes from its checkpoint.

    .venv/bin/python bench/baseline/study.py --only adamw-3e-3 adamw-6e-3  # some points
    .venv/bin/python bench/baseline/study.py --report                      # results.md from saved points
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from lipcli.files import atomic_write
from lipcli.presets import apply_overrides, load_preset
from lipcli.sweep import Point, run_point

HERE = Path(__file__).resolve().parent
ADAMW = {f"adamw-{lr:g}-w{w}": ("shakespeare-baseline", {"train.lr": lr, "train.warmup": w})
         for lr in (1e-3, 2e-3, 3e-3, 4e-3, 6e-3, 1e-2) for w in (0, 50, 100)}  # fmt: skip
MUON = {f"muon-{lr:g}-adamw{alr:g}": ("shakespeare-baseline-muon", {"train.lr": lr, "train.adamw_lr": alr})
        for lr in (0.02, 0.03, 0.05, 0.1, 0.2) for alr in (3e-3, 6e-3)}  # fmt: skip
POINTS = {**ADAMW, **MUON}


def point(name: str) -> Point:
    preset_name, overrides = POINTS[name]
    steps = load_preset("shakespeare-cpu").train.steps
    return Point(name, apply_overrides(load_preset(preset_name), {**overrides, "train.steps": steps}), baseline=True)


def run(name: str) -> dict:
    saved = HERE / "points" / f"{name}.json"
    if saved.exists():
        return json.loads(saved.read_text())
    row = asdict(run_point(point(name), HERE, lambda event: None))
    row["settings"] = POINTS[name][1]
    atomic_write(saved, lambda tmp: tmp.write_text(json.dumps(row, indent=1)))
    return row


def report() -> str:
    rows = [json.loads(p.read_text()) for p in sorted((HERE / "points").glob("*.json"))]
    lines = ["| point | preset | lr | AdamW lr | warm-up | val acc | val loss | max activation | train s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["preset"], -r["val_acc"])):
        s = r.get("settings", {})
        warmup = s.get("train.warmup", load_preset(r["preset"]).train.warmup)
        lines.append(
            f"| {r['name']} | {r['preset']} | {s.get('train.lr', '')} | {s.get('train.adamw_lr', '')} | "
            f"{warmup} | {100 * r['val_acc']:.2f}% | {r['val_loss']:.3f} | "
            f"{r['max_activation']:.4g} | {r['wall_s']:.0f} |"
        )
    # Every run's validation accuracy by step, screens stopped early (behind a finished point) included.
    lines += ["", "Validation accuracy (%) by step; a row that stops early is a screen, stopped once it trailed.", "",
              "| run | " + " | ".join(str(s) for s in range(100, 801, 100)) + " |", "|---|" + "---|" * 8]  # fmt: skip
    for log in sorted((HERE / "runs").glob("*.log.jsonl")):
        accs = {e["step"]: 100 * e["val_acc"] for e in map(json.loads, log.read_text().splitlines())}
        cells = [f"{accs[s]:.1f}" if s in accs else "" for s in range(100, 801, 100)]
        lines.append(f"| {log.name.removesuffix('.safetensors.log.jsonl')} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(HERE / "results.md", lambda tmp: tmp.write_text(text))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(POINTS), help="run these points")
    parser.add_argument("--report", action="store_true", help="only write results.md from saved points")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in [] if args.report else args.only or []:
        row = run(name)
        print(f"{name}: val acc {100 * row['val_acc']:.2f}% loss {row['val_loss']:.3f}", flush=True)
    print(report())


if __name__ == "__main__":
    main()
