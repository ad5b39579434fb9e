"""How large does the activation at the last block's input get, against the bound the certificate composes?

Usage: python bench/content/activation_reach.py CKPT [CKPT ...]. Projected gradient ascent over the certified
domain (token embeddings of RMS <= 1 at every position; 4 restarts x 150 Adam steps) maximises the largest token RMS
after every block but the last. What it finds is a lower bound on the true largest value; the certificate's ``r``
there (the previous stage's output bound in `lipcli certify`) is an upper bound. The query/key term pays ``r^2``.
It also prints the tight bound recomposed with the found value as the last block's r: no sound r is smaller than
the true largest value, so no tighter r alone can take the certificate below that figure.
"""

import sys

import torch

from lipcli import checkpoint
from lipcli.certification import certify_loaded, exact_norm
from lipcli.compose import compose, run, stage_rows

RESTARTS, STEPS, BATCH = 4, 150, 4


def largest_rms_found(model: torch.nn.Module) -> float:
    stages = model.stages()[:-2]  # every block but the last: the head and the last block are left out
    d, t = model.config.d_model, model.config.context
    gen, best = torch.Generator().manual_seed(0), 0.0
    for _ in range(RESTARTS):
        x = torch.randn(BATCH, t, d, generator=gen)
        x = (x / x.pow(2).mean(-1, keepdim=True).sqrt()).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.05)
        for _ in range(STEPS):
            loss = -run(stages, x).pow(2).mean(-1).sqrt().max()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x /= x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1.0)  # back onto the domain
        with torch.no_grad():
            best = max(best, float(run(stages, x).pow(2).mean(-1).sqrt().max()))
    return best


def bound_with_last_r(model: torch.nn.Module, r: float) -> float:
    """The tight bound with the last block and the head certified on inputs of RMS <= r instead of the composed r
    (in float64, as certify computes; converts ``model`` in place)."""
    stages, radius = model.double().stages(), model.domain().radius
    front = compose(stage_rows(stages[:-2], radius, exact_norm, tight=True), radius)
    back = compose(stage_rows(stages[-2:], r, exact_norm, tight=True), r)
    return 10 ** (front.log10_lipschitz + back.log10_lipschitz)


def main(paths: list[str]) -> None:
    for path in paths:
        ckpt = checkpoint.load(path)
        model = ckpt.model.eval().requires_grad_(False)
        found = largest_rms_found(model)  # in the stored precision: certify_loaded converts the model to float64
        report = certify_loaded(ckpt).to_dict()
        feeding = f"block{len(model.blocks) - 2}."  # the block before the last: its last stage's output bound is r
        r = [m for m in report["modules"] if m["name"].startswith(feeding)][-1]["out_norm_tight"]
        bound = 10 ** report["log10_tight"]
        print(f"{path}: found {found:.3f}, certified r {r:.3f}; bound {bound:.2f}, "
              f"{bound_with_last_r(model, found):.2f} at r = {found:.3f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
