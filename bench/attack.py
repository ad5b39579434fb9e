"""Attacked and certified accuracy of several checkpoints side by side, as one markdown table.

Each checkpoint goes through `lipcli.attack.robustness` (what `lipcli attack` runs) at every eps. With
`--relative`, a language model's eps is multiplied by its median token-embedding RMS, so models whose
embeddings live at different scales face the same perturbation relative to their own tokens.

    .venv/bin/python bench/attack.py runs/attack/mlp-adamw.safetensors runs/attack/mlp-softcap3.safetensors \\
        --eps 0.05,0.1,0.2,0.5 --norm l2
    .venv/bin/python bench/attack.py runs/softcap1.safetensors runs/baseline.safetensors \\
        --eps 0.001,0.003,0.01,0.03,0.1,0.3 --norm linf --n 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lipcli import checkpoint
from lipcli.attack import parse_eps, robustness


def median_token_rms(path: Path) -> float:
    weight = checkpoint.load(path).model.embed.weight.detach().double()
    return float(weight.pow(2).mean(dim=-1).sqrt().median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--eps", required=True, help="comma list")
    parser.add_argument("--norm", default="l2", choices=("l2", "linf"))
    parser.add_argument("--attack", default="pgd", choices=("pgd", "apgd", "fgsm"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--relative", action="store_true", help="scale an LM's eps by its median token RMS")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the bench machine has 2 cores shared with other jobs
    print(f"{args.attack} {args.norm}, {args.steps} steps, {args.restarts} restart(s)\n")
    print("| model | L | eps | clean | attacked | drop | certified | mean / max perturbation |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for path in args.checkpoints:
        eps = parse_eps(args.eps)
        arch = checkpoint.load(path).arch
        scale = median_token_rms(path) if args.relative and arch != "lipschitz-mlp" else 1.0
        report = robustness(path, [e * scale for e in eps], norm=args.norm, attack=args.attack, steps=args.steps,
                            restarts=args.restarts, n=args.n, device="cpu")  # fmt: skip
        bound = f"{10**report.log10_bound:.3g}" if report.note is None else "none"
        for row in report.rows:
            shown = f"{row.eps:.3g}" + (f" ({row.eps / scale:g} x {scale:.3g})" if scale != 1.0 else "")
            print(
                f"| {path.name} | {bound} | {shown} | {row.clean_acc:.1%} | {row.adv_acc:.1%} | {row.drop:.1%} "
                f"| {row.certified_acc:.1%} | {row.mean_norm:.3g} / {row.max_norm:.3g} |"
            )
        notes.append(f"- {path.name}: {report.predictions} predictions, {report.seconds:.0f} s; {report.threat}")
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
