"""Behaviour fingerprint for refactors: weight hashes after a fixed-seed run, and certify bounds.

Trains the default preset and mlp-digits for 50 steps (seed 0, 1 thread) through the CLI, hashes
every saved tensor (name, dtype, shape, bytes; metadata such as timestamps is left out), and
certifies each checkpoint plus a freshly initialised one per preset. Run it before and after a
refactor and diff the two JSON files: any difference is a behaviour change.

    LIPCLI_DATA_DIR=../shared/data python bench/identity/run.py --out bench/identity/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from lipcli import checkpoint, presets
from lipcli.certification import certify
from lipcli.models import build_model

TRAINED = ("shakespeare-cpu", "mlp-digits")


def weights_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def bounds(path: Path) -> dict:
    report = certify(path).to_dict()
    keep = ("domain", "norm_pair", "log10_bound", "log10_paper", "log10_tight", "unbounded_reason", "modules")
    return {k: report[k] for k in keep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in TRAINED:
            ckpt = Path(tmp) / f"{name}.safetensors"
            steps = str(args.steps)
            cmd = [sys.executable, "-m", "lipcli", "train", "--preset", name, "--steps", steps, "--eval-every", steps,
                   "--seed", "0", "--device", "cpu", "--out", str(ckpt), "--quiet"]  # fmt: skip
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            result[f"trained/{name}"] = {"weights_sha256": weights_hash(ckpt), "certify": bounds(ckpt)}
        for name in presets.available():
            preset = presets.load_preset(name)
            model = build_model(preset.arch, preset.model)
            path = Path(tmp) / f"init-{name}.safetensors"
            checkpoint.save(path, model)
            result[f"init/{name}"] = {"weights_sha256": weights_hash(path), "certify": bounds(path)}
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}: {len(result)} fingerprints")


if __name__ == "__main__":
    main()
