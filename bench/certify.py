"""Certificates against measured sensitivity, and the time to certify the 145M NanoGPT shape.

For each checkpoint given: both bounds (paper, tight), the measured sensitivity (gradient ascent on
input pairs plus local Jacobian ascent, `lipcli.sensitivity`) and the tightness ratio bound/measured.
Then a `nanogpt-145m`-shaped LipschitzGPT with random weights capped at sigma_max 1 (exact SVD clip):
both bounds and the wall time of `certify` (exact norms, and `--power-iters 6`).

    .venv/bin/python bench/certify.py runs/softcap1.safetensors runs/baseline.safetensors [--skip-nanogpt]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from lipcli import checkpoint
from lipcli.certification import certify
from lipcli.constraints import CapContext, project
from lipcli.models import build_model
from lipcli.presets import load_preset
from lipcli.sensitivity import checkpoint_sensitivity


def nanogpt_timing() -> dict[str, float]:
    preset = load_preset("nanogpt-145m")
    model = build_model(preset.arch, {**preset.model, "zero_init": False})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("embed"):
                p.copy_(project(p, "svd", CapContext(1.0)))
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(Path(tmp) / "nanogpt.safetensors", model)
        # What a user waits for (load + both bounds), each mode timed the same way, side by side.
        started = time.perf_counter()
        exact = certify(path)
        exact_s = time.perf_counter() - started
        started = time.perf_counter()
        fast = certify(path, power_iters=6)
        fast_s = time.perf_counter() - started
    return {
        "params": params,
        "log10_paper": exact.log10_paper,
        "log10_tight": exact.log10_tight,
        "certify_exact_s": exact_s,
        "log10_tight_power6": fast.log10_tight,
        "certify_power6_s": fast_s,
        "power6_speedup": exact_s / fast_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--skip-nanogpt", action="store_true")
    args = parser.parse_args()
    rows = []
    for path in args.checkpoints:
        report = certify(path)
        measured = checkpoint_sensitivity(path, steps=args.steps, restarts=args.restarts)
        row = {
            "checkpoint": str(path),
            "log10_paper": report.log10_paper,
            "log10_tight": report.log10_tight,
            "measured": measured,
            "tightness_paper": 10 ** (report.log10_paper - math.log10(measured))
            if math.isfinite(report.log10_paper)
            else None,
            "tightness_tight": 10 ** (report.log10_tight - math.log10(measured))
            if math.isfinite(report.log10_tight)
            else None,
        }
        rows.append(row)
        print(json.dumps(row))
    if not args.skip_nanogpt:
        print(json.dumps({"nanogpt-145m": nanogpt_timing()}))


if __name__ == "__main__":
    main()
