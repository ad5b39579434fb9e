"""Resuming a run: read its last committed pair and refuse, with one line, anything it cannot continue exactly.

Everything is checked before anything is loaded: the weights' model settings, the optimizer and its
constraint settings, the step of both files and their finiteness.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import anneal, checkpoint, distributed
from .checkpoint import CheckpointError
from .distributed import World
from .models import config_dict
from .presets import Preset, TrainConfig
from .runfiles import Pair, RunFiles


def restore(
    files: RunFiles,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    preset: Preset,
    world: World,
    final_scales: dict[str, float],
) -> tuple[int, list]:
    """Continue from the run at ``files``: rank 0 alone reads it (DDP's constructor then copies its weights).

    ``final_scales``: the model's values of the scales the run anneals; its checkpoints hold the values in use.
    """
    state = distributed.on_main(lambda: _read_run(files, model, optimizer, preset, final_scales), world)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["history"]


def _read_run(
    files: RunFiles, model: nn.Module, optimizer: torch.optim.Optimizer, preset: Preset, final_scales: dict[str, float]
) -> dict[str, Any]:
    """Load the run's last committed weights into ``model``; return its optimizer state, step and history.

    Everything is checked before anything is loaded, so a run that cannot continue fails with one line.
    """
    out = files.out
    pair = files.committed()
    if pair is None:  # written by a lipcli before run records: OUT and OUT.optim.pt are the pair
        pair = Pair(out, checkpoint.load(out).step)
    elif not files.out_is_from_run(pair):
        raise CheckpointError(
            f"--resume: {out} was changed after training (the run's last save is step {pair.step} in "
            f"{files.record}); train a new --out, or delete {files.record} to resume from {out} itself"
        )
    ckpt = checkpoint.load(pair.weights)
    if ckpt.arch != preset.arch:
        raise CheckpointError(f"--resume: {out} holds a {ckpt.arch} model, the preset trains {preset.arch}")
    # The last step before the save ran at the annealed scales of its index (lipcli/anneal.py).
    in_use = anneal.scales_at(ckpt.step - 1, preset.train, final_scales) if final_scales else {}
    _check_same_model(out, ckpt.model_config, {**config_dict(model), **in_use})
    # checkpoint.load has refused NaN/inf weights already, naming the tensor.
    state = checkpoint.load_optimizer(pair.weights)
    saved_step = state["extra"].get("step") if isinstance(state["extra"], dict) else None
    if ckpt.step != pair.step:
        raise CheckpointError(f"--resume: {files.manifest} names step {pair.step}, its weights are at step {ckpt.step}")
    # Legacy runs wrote the two files one after the other: a kill between them left them at different steps.
    if saved_step != ckpt.step:
        raise CheckpointError(
            f"--resume: {out} is at step {ckpt.step} but its optimizer state at step {saved_step} "
            "(the run was killed while saving): train again without --resume"
        )
    _check_same_optimizer(out, ckpt.train_config.get("optimizer"), state["optimizer"], optimizer, preset.train)
    try:
        history = json.loads(state["extra"]["history"])
    except (KeyError, TypeError, ValueError):
        history = None
    if not (isinstance(history, list) and all(isinstance(row, dict) and "wall_s" in row for row in history)):
        raise CheckpointError(f"{pair.optimizer}: no readable history in the optimizer state")
    model.load_state_dict(ckpt.model.state_dict())
    if pair.weights != out:
        files.publish(pair)  # a kill between the commit and the publish left OUT one save behind
    return {"optimizer": state["optimizer"], "step": ckpt.step, "history": history}


def _check_same_model(out: Path, saved: dict, wanted: dict) -> None:
    changed = [
        f"{k} {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(saved | wanted) if saved.get(k) != wanted.get(k)
    ]
    if changed:
        raise CheckpointError(
            f"--resume: {out} was trained with other model settings ({', '.join(changed)}); "
            "resume with the run's settings or train a new --out"
        )


def _check_same_optimizer(
    out: Path, trained_with: Any, saved: Any, optimizer: torch.optim.Optimizer, t: TrainConfig
) -> None:
    """The saved state must be this optimizer's, for these parameters, with the same constraint settings."""
    if trained_with != t.optimizer:
        raise CheckpointError(
            f"--resume: {out} was trained with --optimizer {trained_with}, this run asks {t.optimizer}; "
            f"resume with --optimizer {trained_with} or train a new --out"
        )
    unfit = CheckpointError(f"--resume: {checkpoint.optimizer_path(out)} does not fit this model's optimizer")
    groups, state = (saved.get("param_groups"), saved.get("state")) if isinstance(saved, dict) else (None, None)
    if not (isinstance(groups, list) and isinstance(state, dict) and len(groups) == len(optimizer.param_groups)):
        raise unfit
    params: list[Tensor] = []
    for fresh, old in zip(optimizer.param_groups, groups, strict=True):
        if not (isinstance(old, dict) and isinstance(old.get("params"), list)) or len(old["params"]) != len(
            fresh["params"]
        ):
            raise unfit
        # lr is set afresh every step from this run's settings; everything else would silently stay the run's.
        for key in sorted(fresh.keys() & old.keys() - {"params", "lr", "initial_lr"}):
            if type(old[key]) is not type(fresh[key]) or old[key] != fresh[key]:
                raise CheckpointError(
                    f"--resume: {out} was trained with {key} {old[key]!r} for group {fresh.get('name', '?')}, "
                    f"this run asks {fresh[key]!r}; resume with the run's settings or train a new --out"
                )
        params += fresh["params"]
    for index, entry in state.items():
        if not (isinstance(index, int) and 0 <= index < len(params) and isinstance(entry, dict)):
            raise unfit
        tensors = {k: v for k, v in entry.items() if isinstance(v, Tensor)}
        if any(v.dim() > 0 and v.shape != params[index].shape for v in tensors.values()):
            raise unfit
        if checkpoint.first_non_finite(tensors) is not None:
            raise CheckpointError(f"--resume: {checkpoint.optimizer_path(out)} holds NaN/inf optimizer state")
