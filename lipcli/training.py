"""The training loop: data, model, constrained optimizer, evaluation, checkpoints, NaN guard; then the certificate.

Rendering stays out: progress goes to an ``on_event`` callback (the CLI draws a rich bar from it).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import anneal, checkpoint, distributed
from .certification import certify
from .distributed import SINGLE, World, resolve_device
from .errors import UserError
from .files import atomic_write
from .models import build_model, max_weight_norm
from .optim import Muon, MuonWithAdamW, build_optimizer, check_method, optimizer_groups
from .presets import Preset, PresetError, TrainConfig, check_train_config
from .recall import IGNORE_INDEX
from .resume import restore
from .runfiles import RunFiles
from .tasks import Task, make_task


class TrainingError(RuntimeError):
    """A run that had to stop; the message says why and where the last good checkpoint is."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, still an interrupt to callers; the message says which checkpoint is kept."""


@dataclass
class TrainResult:
    checkpoint: Path
    step: int
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


Event = dict[str, Any]


def validate(preset: Preset, world_size: int = 1) -> Preset:
    """``preset`` checked for ``world_size`` processes before any data is read or any file written.

    Returned with its train fields in their declared types (a TrainConfig built in Python may hold an int lr).
    """
    t = check_train_config(preset.train)
    try:
        check_method(t.optimizer, t.method, t.wd)
    except ValueError as exc:  # the optimizer module's plain ValueError: here it is the user's choice
        raise PresetError(str(exc)) from None
    resolve_device(t.device)
    distributed.local_batch_size(t.batch_size, World(size=world_size))
    check_model_settings(preset)
    return replace(preset, train=t)


def check_model_settings(preset: Preset) -> None:
    """The train settings that name parts of the model: train.caps and train.lr_mult must name its parameter
    groups, train.anneal_from its fixed scales (lipcli/anneal.py)."""
    t = preset.train
    if not (t.caps or t.lr_mult or t.anneal_from):
        return
    with torch.device("meta"):  # shapes only: no memory, no init
        model = build_model(preset.arch, preset.model, init=False)
    try:
        optimizer_groups(model.declared_parameters(), t.sigma_max, t.caps, t.lr_mult, model=preset.arch)
    except UserError as exc:
        raise PresetError(str(exc)) from None
    anneal.check(model, t, preset.arch)


def lr_factor(step: int, t: TrainConfig) -> float:
    """Warm-up then linear/cosine decay to zero (or constant) at ``t.steps``."""
    if step < t.warmup:
        return (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    if t.schedule == "linear":
        return max(0.0, 1.0 - progress)
    if t.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def loss_and_correct(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and the number of correct predictions, both over the labels that are not IGNORE_INDEX."""
    logits = model(x).float()
    loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE_INDEX)
    correct = (logits.argmax(dim=-1) == y).sum()  # an argmax is never IGNORE_INDEX: ignored labels count as wrong
    return loss, correct


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterator[tuple[Tensor, Tensor]], autocast: torch.autocast, world: World = SINGLE
) -> dict[str, float]:
    """Loss and accuracy over the labelled positions of ``batches`` (IGNORE_INDEX skipped); with several ranks,
    each passes its own share and the sums are pooled."""
    was_training = model.training
    model.eval()
    total_loss, total_correct, total = 0.0, 0, 0
    for x, y in batches:
        counted = int((y != IGNORE_INDEX).sum())
        with autocast:
            loss, correct = loss_and_correct(model, x, y)
        total_loss += float(loss) * counted
        total_correct += int(correct)
        total += counted
    model.train(was_training)
    device = next(model.parameters()).device
    total_loss, total_correct, total = distributed.sum_over_ranks([total_loss, total_correct, total], world, device)
    return {"val_loss": total_loss / max(1, total), "val_acc": total_correct / max(1, total)}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(
    preset: Preset,
    out: str | Path,
    *,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
) -> TrainResult:
    """Train ``preset`` and write the checkpoint to ``out`` (with ``out``.optim.pt and ``out``.log.jsonl).

    Under torchrun (or in a process group the caller started) each rank trains on its slice of every
    global batch with DDP; only rank 0 writes files and calls ``on_event``.
    """
    world = distributed.current_world()
    preset = validate(preset, world.size)
    device = distributed.process_device(resolve_device(preset.train.device), world)
    files = RunFiles(Path(out))
    with distributed.joined(device) as world, ExitStack() as held:  # held: the lock, taken in _train
        distributed.on_main(files.check_writable, world)  # rank 0 alone writes files
        return _train(preset, files, held, resume, on_event if world.is_main else None, device, world)


def default_out(preset: Preset) -> Path:
    """Where a run is written when no path is given: ``runs/<preset>-<method>-<sigma>.safetensors``."""
    t = preset.train
    return Path("runs") / f"{preset.name}-{t.method}-{t.sigma_max:g}.safetensors"


def certified_summary(preset: Preset, result: TrainResult) -> dict[str, Any]:
    """The run's settings and last metrics next to the certificate of the weights it saved."""
    bound = certify(result.checkpoint)
    t = preset.train
    return {"checkpoint": str(result.checkpoint), "preset": preset.name, "method": t.method,
            "optimizer": t.optimizer, "sigma_max": t.sigma_max, **result.metrics,
            "log10_bound": bound.log10_bound, "log10_bound_paper": bound.log10_paper,
            "bound_norm": bound.norm_pair}  # fmt: skip


def _train(
    preset: Preset,
    files: RunFiles,
    held: ExitStack,
    resume: bool,
    on_event: Callable[[Event], None] | None,
    device: torch.device,
    world: World,
) -> TrainResult:
    t, out = preset.train, files.out
    emit = on_event or (lambda event: None)
    torch.manual_seed(t.seed)
    task = make_task(preset, world)
    data_fields = task.model_fields()
    # A preset may pad the data's vocabulary (nanogpt-145m: 50304 for GPT-2's 50257) for faster kernels.
    if preset.model.get("vocab_size", 0) >= data_fields.get("vocab_size", math.inf):
        del data_fields["vocab_size"]
    model_config = {**preset.model, **data_fields, "seed": t.seed}
    model = build_model(preset.arch, model_config).to(device)
    groups = optimizer_groups(model.declared_parameters(), t.sigma_max, t.caps, t.lr_mult, t.blocks_mass, preset.arch)
    optimizer = build_optimizer(
        t.optimizer, groups, t.lr, t.method, t.wd, rank=world.rank, world_size=world.size,
        embed_inflation=t.embed_inflation, adamw_lr=t.adamw_lr,
    )  # fmt: skip
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    final_scales = anneal.targets(model, t)
    start_step, history = 0, []
    # Locked only now: a run that fails on its data or configuration leaves no trace at --out.
    distributed.on_main(lambda: _lock(files, held), world)
    if resume:
        start_step, history = restore(files, model, optimizer, preset, world, final_scales)
    elif files.log.exists() and world.is_main:
        files.log.unlink()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.dtype == "bf16")
    # Compile the DDP wrapper, not the reverse: torch.compile then splits graphs at DDP's bucket boundaries.
    step_fn = distributed.data_parallel(model, device, world)
    step_fn = torch.compile(step_fn) if t.compile else step_fn
    train_config = {**asdict(t), "preset": preset.name, "arch": preset.arch}
    emit({"type": "start", "step": start_step, "steps": t.steps, "device": str(device), "params": _n_params(model)})

    metrics: dict[str, float] = history[-1] if history else {}
    step, last_saved = start_step, start_step if resume else None
    tokens, started = 0, time.perf_counter()
    wall_before = history[-1]["wall_s"] if history else 0.0
    model.train()
    try:
        while step < t.steps:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * lr_factor(step, t)
            if final_scales:
                model.set_fixed_scales(anneal.scales_at(step, t, final_scales))
            x, y = task.batch(step, device)
            with autocast:
                loss, _ = loss_and_correct(step_fn, x, y)
            evaluating = (step + 1) % t.eval_every == 0 or step + 1 == t.steps
            # Reading the loss syncs the host with the device: on CUDA do it every 10 steps and before saving.
            check = device.type == "cpu" or (step + 1) % 10 == 0 or evaluating
            # The mean over ranks: every rank sees the same value, so all stop together on a NaN.
            loss_value = distributed.mean_over_ranks(loss.detach(), world) if check else None
            if loss_value is not None and not math.isfinite(loss_value):
                raise TrainingError(_diverged("loss", step, last_saved, out))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            tokens += task.tokens_per_batch()
            elapsed = time.perf_counter() - started
            emit({"type": "step", "step": step, "loss": loss_value, "tokens_per_s": tokens / max(elapsed, 1e-9)})
            if evaluating:
                evaluation = evaluate(model, task.eval_batches(device), autocast, world)
                # Before any norm is taken: the SVD of a NaN matrix fails instead of reporting the divergence.
                if not (math.isfinite(evaluation["val_loss"]) and _all_finite(model.state_dict())):
                    raise TrainingError(_diverged("validation loss or weights", step, last_saved, out))
                metrics = {
                    "step": step,
                    "train_loss": loss_value,
                    **evaluation,
                    "max_sigma": max_weight_norm(model, torch.float32),  # float32: cheap on the device
                    "tokens_per_s": tokens / max(elapsed, 1e-9),
                    "peak_memory_mb": _peak_memory_mb(device),
                    "wall_s": wall_before + elapsed,
                }
                history.append(metrics)
                optimizer_state = _full_optimizer_state(optimizer, world)
                if world.is_main:
                    try:
                        _save(files, model, optimizer_state, train_config, step, task, history)
                    except OSError as exc:  # a full disk or a folder gone: the committed pair is untouched
                        reason = exc.strerror or str(exc)
                        raise TrainingError(
                            f"could not save step {step} ({reason}); {_kept(last_saved, out)}"
                        ) from None
                last_saved = step
                emit({"type": "eval", **metrics})
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"interrupted at step {step}; "
            + (
                f"last checkpoint {out} is at step {last_saved}: continue with --resume"
                if last_saved
                else "no checkpoint yet"
            )
        ) from None
    return TrainResult(out, step, metrics, history)


def _full_optimizer_state(optimizer: torch.optim.Optimizer, world: World) -> dict | None:
    """Every parameter's optimizer state, on rank 0 (None elsewhere): sharded Muon gathers it from the owners."""
    if isinstance(optimizer, MuonWithAdamW) and world.size > 1:
        muon = distributed.gather_sharded_state(optimizer.muon, world)
        return MuonWithAdamW.joined(muon, optimizer.adamw.state_dict()) if muon is not None else None
    if isinstance(optimizer, Muon) and world.size > 1:
        return distributed.gather_sharded_state(optimizer, world)
    return optimizer.state_dict() if world.is_main else None


def _lock(files: RunFiles, held: ExitStack) -> None:
    held.enter_context(files)


def _all_finite(tensors: dict[str, Tensor]) -> bool:
    return checkpoint.first_non_finite(tensors) is None


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kept(last_saved: int | None, out: Path) -> str:
    if last_saved:
        return f"the last good checkpoint {out} (step {last_saved}) is kept"
    return "no checkpoint was written"


def _diverged(what: str, step: int, last_saved: int | None, out: Path) -> str:
    return f"{what} became NaN/inf at step {step}; {_kept(last_saved, out)}. Lower --lr or --sigma-max."


def _save(
    files: RunFiles,
    model: nn.Module,
    optimizer_state: dict,
    train_config: dict,
    step: int,
    task: Task,
    history: list[dict[str, Any]],
) -> None:
    """Weights and optimizer state as one committed pair, then the log of every evaluation so far."""
    pair = files.next_pair(step)
    metrics = history[-1]
    checkpoint.save(pair.weights, model, train_config=train_config, metrics=metrics, step=step,
                    tokenizer=task.tokenizer_dict())  # fmt: skip
    checkpoint.save_optimizer(pair.weights, optimizer_state, {"step": step, "history": json.dumps(history)})
    files.commit(pair)
    # Rewritten whole from the history, so it always matches the committed pair.
    rows = "".join(json.dumps(row, allow_nan=False) + "\n" for row in history)
    atomic_write(files.log, lambda tmp: tmp.write_text(rows))
