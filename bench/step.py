"""Training-step time, side by side in one run: LipschitzGPT + Muon + softcap vs BaselineGPT + AdamW.

Both models take the preset's shape (default: shakespeare-cpu) and the same random batch; each step
is forward, backward and the optimizer step (with its constraint). Prints median seconds per step,
tokens/s, the ratio lipcli/baseline, and our Muon step alone against torch.optim.Muon on the same
parameters.

    .venv/bin/python bench/step.py [--preset shakespeare-cpu] [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lipcli.models import build_model
from lipcli.optim import Group, Muon, build_optimizer, optimizer_groups, param_groups
from lipcli.presets import load_preset


def _time_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, steps: int) -> float:
    times = []
    for i in range(steps + 3):
        started = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 3:  # the first steps pay one-off allocation and the first exact cap
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _time_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    times = []
    for i in range(steps + 2):
        started = time.perf_counter()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shakespeare-cpu")
    parser.add_argument("--baseline", default="shakespeare-baseline")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ours, base = load_preset(args.preset), load_preset(args.baseline)
    vocab = 65
    t = ours.train
    tokens = torch.randint(
        0, vocab, (t.batch_size, ours.model["context"] + 1), generator=torch.Generator().manual_seed(0)
    )
    lip = build_model(ours.arch, {**ours.model, "vocab_size": vocab, "zero_init": False})
    lip_opt = build_optimizer(
        "muon", optimizer_groups(lip.declared_parameters(), t.sigma_max, t.caps, {}), t.lr, t.method, t.wd
    )
    baseline = build_model(base.arch, {**base.model, "vocab_size": vocab})
    base_opt = build_optimizer(
        "adamw", optimizer_groups(baseline.declared_parameters(), 1.0, {}, {}), base.train.lr, "none", base.train.wd
    )
    lip_s = _time_steps(lip, lip_opt, tokens, args.steps)
    base_s = _time_steps(baseline, base_opt, tokens, args.steps)

    # Muon alone on 2-D matrices (torch.optim.Muon takes 2-D only): ours without a constraint vs torch's.
    shapes = [(256, 256)] * 4 + [(1024, 256), (256, 1024)] * 3
    ours_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    groups = param_groups([Group("matrices", ours_params, kind="matrix")], lr=0.02, method="none", wd=0.0)
    ours_muon_s = _time_optimizer(Muon(groups, lr=0.02), ours_params, args.steps)
    torch_muon_s = _time_optimizer(torch.optim.Muon(torch_params, lr=0.02, weight_decay=0.0), torch_params, args.steps)

    tokens_per_step = t.batch_size * ours.model["context"]
    result = {
        "threads": torch.get_num_threads(),
        "lipcli_step_s": lip_s,
        "baseline_step_s": base_s,
        "lipcli_tokens_per_s": tokens_per_step / lip_s,
        "baseline_tokens_per_s": tokens_per_step / base_s,
        "step_ratio": lip_s / base_s,
        "our_muon_s": ours_muon_s,
        "torch_muon_s": torch_muon_s,
        "muon_ratio": ours_muon_s / torch_muon_s,
    }
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>22}: {value:.4g}")


if __name__ == "__main__":
    main()
