"""Data-parallel scaling, side by side in one run: `lipcli train` on 1 process vs `--nproc N` (torchrun, gloo on CPU).

Both train the preset (default shakespeare-cpu) for --steps steps with the same global batch and the
same threads per process; tokens/s is the trainer's own figure (global tokens over training time,
evaluation and start-up excluded). Prints tokens/s in all and per process, and the ratios N / 1.

    .venv/bin/python bench/scaling.py [--preset shakespeare-cpu] [--steps 20] [--nproc 2] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _tokens_per_s(preset: str, steps: int, nproc: int, threads: int, out: Path) -> float:
    """The trainer's tokens/s (all processes together) for one run of ``nproc`` processes."""
    launch = ["--nproc", str(nproc)] if nproc > 1 else []
    command = [sys.executable, "-m", "lipcli", "train", "--preset", preset, "--steps", str(steps),
               "--eval-every", str(steps), "--device", "cpu", "--out", str(out), "--json", *launch]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.setdefault("LIPCLI_DATA_DIR", str(SHARED_DATA))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads(result.stdout)["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shakespeare-cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="Threads per process (OMP_NUM_THREADS).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        single = _tokens_per_s(args.preset, args.steps, 1, args.threads, Path(tmp) / "one.safetensors")
        multi = _tokens_per_s(args.preset, args.steps, args.nproc, args.threads, Path(tmp) / "many.safetensors")
    result = {
        "preset": args.preset,
        "steps": args.steps,
        "threads_per_process": args.threads,
        "nproc": args.nproc,
        "one_process_tokens_per_s": single,
        "multi_tokens_per_s": multi,
        "multi_tokens_per_s_per_process": multi / args.nproc,
        "speedup": multi / single,
        "per_process_ratio": multi / args.nproc / single,
    }
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")


if __name__ == "__main__":
    main()
