"""Sweeps: the Lipschitz-vs-accuracy frontier over optimizers, constraint methods and sigma_max.

Each point of the grid trains one model, certifies it (tight and paper bounds) and profiles its largest
activation. A point's row is saved to ``DIR/points/<name>.json`` the moment it finishes, so a killed sweep
continues where it stopped; ``DIR/results.csv``, ``DIR/results.json`` and ``DIR/frontier.png`` are
rewritten at the end. ``DIR/sweep.json`` pins the base settings: a directory holds one sweep.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .activations import profile
from .certification import certify
from .constraints import get_method
from .data import DataError
from .errors import UserError
from .files import atomic_write, one_line, strict_json
from .optim import check_method
from .presets import Preset, apply_overrides, load_preset
from .sweep_records import COLUMNS, SIGMA_FREE_METHODS, Failure, Grid, Point, Row, Skipped, SweepResult
from .training import TrainingError, train, validate

Event = dict[str, Any]
EventHandler = Callable[[Event], None]

GRID_KEYS = ("optimizer", "method", "sigma_max")
# An optimizer's learning rate does not carry over to another (Muon's 0.1 would wreck AdamW): these are the
# defaults of the reference configs (Muon: the paper's Shakespeare run; AdamW: shakespeare-baseline).
DEFAULT_LRS = {"muon": 0.1, "adamw": 3e-3}
# The baseline gets the sweep's size, data and budget; its optimizer recipe (optimizer, lr, wd, ...) stays its own.
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "context", "mlp_ratio")
BUDGET_FIELDS = ("data", "val_data", "tokenizer", "val_fraction", "steps", "batch_size", "eval_every",
                 "eval_batches", "seed", "device", "dtype", "compile",
                 "recall_keys", "recall_values", "recall_pairs", "recall_queries")  # fmt: skip
PANELS = (("val_acc", "validation accuracy"), ("val_loss", "validation loss"))
PROFILE_BATCHES = 2
PROFILE_BATCH_SIZE = 16
_POLL_S = 0.2


def sweep(
    preset_name: str,
    optimizers: Sequence[str],
    methods: Sequence[str],
    sigmas: Sequence[float],
    out_dir: str | Path,
    steps: int | None = None,
    decays: Sequence[float] | None = None,
    lrs: Mapping[str, float] | None = None,
    overrides: Mapping[str, Any] | None = None,
    baseline: bool | str = True,
    jobs: int = 1,
    on_event: EventHandler | None = None,
) -> SweepResult:
    """Train, certify and profile every valid (optimizer, method, sigma_max) of the grid, plus a baseline.

    ``baseline``: True for the preset's unconstrained references (its ``baselines``), a preset name, or False.
    ``decays``: the weight-decay strengths of the wd method's points (default: the preset's train.wd).
    ``lrs``: learning rate per optimizer (default: the preset's for its own optimizer, DEFAULT_LRS for another).
    A failed run is reported in ``failed`` while the others go on; bad input raises ValueError before any run.
    """
    emit = on_event or _ignore
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {jobs})")
    _figure_class()  # a missing matplotlib should fail now, not after hours of training
    base = base_preset(preset_name, steps, overrides or {})
    grid = expand_grid(base, optimizers, methods, sigmas, decays, lrs)
    points = grid.points + baseline_points(base, baseline)
    for point in points:
        validate(point.preset)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; the sweep needs a directory")
    _pin_settings(out_dir, base)
    saved = {p.name: row for p in points if (row := _saved_row(out_dir, p.name)) is not None}
    todo = [p for p in points if p.name not in saved]
    emit({"type": "sweep_start", "points": [p.name for p in points], "todo": [p.name for p in todo],
          "steps": base.train.steps})  # fmt: skip
    for row in saved.values():
        emit({"type": "point_done", "point": row.name, "row": asdict(row), "cached": True})
    if jobs == 1 or not todo:
        rows, failed = _run_serial(todo, out_dir, emit)
    else:
        rows, failed = _run_parallel(todo, out_dir, jobs, emit)
    result = SweepResult(out_dir, _by_bound([*saved.values(), *rows]), grid.skipped, failed, grid.notes)
    write_results(result)
    return result


def base_preset(preset_name: str, steps: int | None, overrides: Mapping[str, Any]) -> Preset:
    """The preset every grid point starts from; the grid's own keys cannot be overridden."""
    for key in overrides:
        if key.rpartition(".")[2] in GRID_KEYS:
            raise UserError(f"--set {key}: the sweep sets it; use --optimizer, --method or --sigma-max")
    budget = {} if steps is None else {"train.steps": steps}
    return apply_overrides(load_preset(preset_name), {**budget, **overrides})


def expand_grid(
    base: Preset,
    optimizers: Sequence[str],
    methods: Sequence[str],
    sigmas: Sequence[float],
    decays: Sequence[float] | None = None,
    lrs: Mapping[str, float] | None = None,
) -> Grid:
    """Every valid (optimizer, method, sigma_max) point, the invalid pairs with their reasons, and notes.

    The wd method's knob is its decay strength, not sigma_max: it gets one point per value of ``decays``.
    """
    decay_values = list(dict.fromkeys(decays)) if decays else [base.train.wd]
    learning_rates = {**DEFAULT_LRS, base.train.optimizer: base.train.lr, **(lrs or {})}
    optimizers, methods, sigmas = (list(dict.fromkeys(v)) for v in (optimizers, methods, sigmas))
    _check_axes(optimizers, methods, sigmas)
    _check_knobs(optimizers, decay_values, lrs or {})
    points: dict[str, Point] = {}
    skipped: list[Skipped] = []
    for optimizer in optimizers:
        for method in methods:
            wds = decay_values if method == "wd" else [base.train.wd]
            try:
                for wd in wds:
                    check_method(optimizer, method, wd)
            except UserError as exc:
                skipped.append(Skipped(optimizer, method, str(exc)))
                continue
            for sigma in [None] if method in SIGMA_FREE_METHODS else sigmas:
                for wd in wds:
                    point = grid_point(base, optimizer, method, sigma, wd if method == "wd" else None)
                    point = Point(point.name, apply_overrides(point.preset, {"train.lr": learning_rates[optimizer]}))
                    points.setdefault(point.name, point)
    if not points:
        raise UserError(f"no (optimizer, method) pair of the grid can run: {skipped[0].reason}")
    used = {opt: learning_rates[opt] for opt in optimizers if opt in learning_rates}
    lr_note = "learning rates: " + ", ".join(f"{opt} {lr:g}" for opt, lr in used.items())
    return Grid(list(points.values()), skipped, [*_notes(base, methods, sigmas), lr_note])


def _check_axes(optimizers: list[str], methods: list[str], sigmas: list[float]) -> None:
    for option, values in (("--optimizer", optimizers), ("--method", methods), ("--sigma-max", sigmas)):
        if not values:
            raise UserError(f"{option} needs at least one value")
    for optimizer in optimizers:
        check_method(optimizer, "none")  # none pairs with every optimizer: this rejects only unknown names
    for method in methods:
        get_method(method)
    for sigma in sigmas:
        if not (math.isfinite(sigma) and sigma > 0):
            raise UserError(f"--sigma-max values must be finite and > 0 (got {sigma:g})")


def _check_knobs(optimizers: list[str], decays: list[float], lrs: Mapping[str, float]) -> None:
    """--decay and --lr values, which would otherwise train to NaN (or be ignored) instead of failing here."""
    for decay in decays:
        if not (math.isfinite(decay) and decay >= 0):
            raise UserError(f"--decay values must be finite and >= 0 (got {decay:g})")
    for optimizer, lr in lrs.items():
        if optimizer not in optimizers:
            raise UserError(f"--lr {optimizer}=...: {optimizer!r} is not in --optimizer ({', '.join(optimizers)})")
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lr {optimizer} must be finite and > 0 (got {lr:g})")


def _notes(base: Preset, methods: list[str], sigmas: list[float]) -> list[str]:
    notes = [f"{m} ignores sigma_max: one run per optimizer{' and decay' if m == 'wd' else ''}, not one per sigma"
             for m in methods
             if m in SIGMA_FREE_METHODS and len(sigmas) > 1]  # fmt: skip
    return notes


def grid_point(base: Preset, optimizer: str, method: str, sigma: float | None, wd: float | None = None) -> Point:
    """``base`` with one grid value each; ``sigma`` (``wd``) None keeps the preset's."""
    axes: dict[str, Any] = {"train.optimizer": optimizer, "train.method": method}
    name = f"{optimizer}-{method}"
    if sigma is not None:
        axes["train.sigma_max"], name = float(sigma), f"{name}-{sigma:g}"
    if wd is not None:
        axes["train.wd"], name = float(wd), f"{name}-{wd:g}"
    return Point(name, apply_overrides(base, axes))


def baseline_points(base: Preset, baseline: bool | str) -> list[Point]:
    """The unconstrained references at the sweep's size, data and budget: the preset's ``baselines``
    (True), one named preset, or none (False)."""
    if baseline is False:
        return []
    names = base.baselines if baseline is True else (baseline,)
    if not names:
        raise UserError(f"preset {base.name} names no baselines: use --baseline-preset NAME or --no-baseline")
    return [reference_point(base, name) for name in names]


def reference_point(base: Preset, name: str) -> Point:
    """Preset ``name`` (its own optimizer recipe) at ``base``'s shape, data and budget."""
    reference = load_preset(name)
    shape = {f"model.{key}": base.model[key] for key in SHAPE_FIELDS if key in base.model}
    budget = {f"train.{key}": getattr(base.train, key) for key in BUDGET_FIELDS}
    return Point(reference.name, apply_overrides(reference, {**shape, **budget}), baseline=True)


def _settings(base: Preset) -> dict[str, Any]:
    train_config = {key: value for key, value in asdict(base.train).items() if key not in GRID_KEYS}
    # Through JSON so a fresh dict compares equal to the one read back from disk.
    return json.loads(strict_json({"preset": base.name, "arch": base.arch, "model": base.model, "train": train_config}))


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"steps": 6}}`` as ``{"train.steps": 6}``, so a difference can be named."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def _pin_settings(out_dir: Path, base: Preset) -> None:
    """Record the base settings in DIR/sweep.json, or refuse a directory that holds a sweep of other settings."""
    path = out_dir / "sweep.json"
    settings = _settings(base)
    if not path.exists():
        atomic_write(path, lambda tmp: tmp.write_text(strict_json(settings)))
        return
    pinned, current = _flat(_read_json_object(path)), _flat(settings)
    changed = sorted(key for key in pinned.keys() | current.keys() if pinned.get(key) != current.get(key))
    if changed:
        diff = ", ".join(f"{key} {pinned.get(key)!r} -> {current.get(key)!r}" for key in changed[:3])
        raise UserError(f"{out_dir} holds a sweep with other settings ({diff}); use another --out")


def _point_path(out_dir: Path, name: str) -> Path:
    return out_dir / "points" / f"{name}.json"


def _saved_row(out_dir: Path, name: str) -> Row | None:
    path = _point_path(out_dir, name)
    if not path.exists():
        return None
    try:
        return Row.from_dict(_read_json_object(path))
    except (KeyError, TypeError):
        raise UserError(f"{path}: not a sweep result row; delete it to rerun the point") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object the sweep wrote earlier; anything else in its place is the user's to remove."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or UTF-8
        raise UserError(f"{path}: unreadable sweep file ({one_line(exc)}); delete it or use another --out") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object; delete it or use another --out")
    return value


def run_point(point: Point, out_dir: Path, emit: EventHandler) -> Row:
    """Train (or finish training), certify and profile one point; save and return its row."""
    path = out_dir / "runs" / f"{point.name}.safetensors"
    # A killed point continues from its last checkpoint rather than restarting: DIR/sweep.json and the point's
    # name pin its settings, and train(resume=True) gives the same result as an uninterrupted run.
    resume = path.exists() and checkpoint.optimizer_path(path).exists()
    result = train(point.preset, path, resume=resume, on_event=lambda event: emit({**event, "point": point.name}))
    measured_from = time.perf_counter()
    report = certify(result.checkpoint)
    activations = profile(result.checkpoint, batches=PROFILE_BATCHES, batch_size=PROFILE_BATCH_SIZE,
                          device=point.preset.train.device)  # fmt: skip
    t, metrics = point.preset.train, result.metrics
    row = Row(name=point.name, preset=point.preset.name, optimizer=t.optimizer, method=t.method,
              sigma_max=point.sigma_max, wd=t.wd, baseline=point.baseline, log10_tight=report.log10_tight,
              log10_paper=report.log10_paper, val_loss=metrics["val_loss"], val_acc=metrics["val_acc"],
              max_activation=activations.max_abs, wall_s=metrics["wall_s"] + time.perf_counter() - measured_from,
              checkpoint=str(path))  # fmt: skip
    atomic_write(_point_path(out_dir, point.name), lambda tmp: tmp.write_text(strict_json(asdict(row))))
    return row


def _run_serial(points: list[Point], out_dir: Path, emit: EventHandler) -> tuple[list[Row], list[Failure]]:
    rows, failed = [], []
    for point in points:
        try:
            rows.append(_finished(point, run_point(point, out_dir, emit), emit))
        except DataError:
            raise  # the data is every point's: stop at the first as bad input
        except KeyboardInterrupt:
            raise _interrupted(out_dir) from None
        except Exception as exc:
            # A Ctrl-C that surfaced as another error (raised while handling it) still stops the sweep.
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise _interrupted(out_dir) from None
            failed.append(_failure(point, exc, emit))
    return rows, failed


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# In a worker process: the queue to the parent and the parent's stop flag, set by _start_worker.
_worker_events: Any = None
_worker_stop: Any = None


def _start_worker(events: Any, stop: Any, threads: int) -> None:
    """A worker's share of the cores, the queue that carries its training events home, and the stop flag."""
    global _worker_events, _worker_stop
    torch.set_num_threads(threads)
    _worker_events, _worker_stop = events, stop


def _worker_emit(event: Event) -> None:
    if _worker_stop.is_set():
        raise KeyboardInterrupt  # the parent stopped: end the run as Ctrl-C does, keeping its last checkpoint
    _worker_events.put(event)


def _run_in_worker(point: Point, out_dir: Path) -> Row:
    return run_point(point, out_dir, _worker_emit)


def _run_parallel(points: list[Point], out_dir: Path, jobs: int, emit: EventHandler) -> tuple[list[Row], list[Failure]]:
    context = multiprocessing.get_context("spawn")
    # A SimpleQueue writes synchronously: a point's events are in the pipe before its result is.
    events, stop = context.SimpleQueue(), context.Event()
    threads = max(1, _cores() // jobs)
    pool = ProcessPoolExecutor(
        min(jobs, len(points)), mp_context=context, initializer=_start_worker, initargs=(events, stop, threads)
    )
    futures = {pool.submit(_run_in_worker, point, out_dir): point for point in points}
    try:
        return _collect(futures, events, emit)
    except BaseException as exc:
        # Stop the running points at their next step and drop the queued ones; finished rows are saved already.
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        while not all(future.done() for future in futures):
            wait(futures, timeout=_POLL_S)
            _forward(events, _ignore)  # a worker blocked on a full pipe could never see the stop flag
        if isinstance(exc, KeyboardInterrupt):
            raise _interrupted(out_dir) from None
        raise
    finally:
        pool.shutdown()


def _collect(futures: dict[Future[Row], Point], events: Any, emit: EventHandler) -> tuple[list[Row], list[Failure]]:
    rows, failed, pending = [], [], set(futures)
    while pending:
        done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
        _forward(events, emit)
        for future in done:
            point, error = futures[future], future.exception()
            if isinstance(error, DataError):
                raise error
            if error is None:
                rows.append(_finished(point, future.result(), emit))
            else:
                failed.append(_failure(point, error, emit))
    return rows, failed


def _forward(events: Any, emit: EventHandler) -> None:
    while not events.empty():
        emit(events.get())


def _finished(point: Point, row: Row, emit: EventHandler) -> Row:
    emit({"type": "point_done", "point": point.name, "row": asdict(row), "cached": False})
    return row


def _failure(point: Point, exc: BaseException, emit: EventHandler) -> Failure:
    message = one_line(exc) if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {one_line(exc)}"
    emit({"type": "point_failed", "point": point.name, "error": message})
    return Failure(point.name, message)


def _interrupted(out_dir: Path) -> TrainingError:
    return TrainingError(f"sweep interrupted; finished points are kept in {out_dir}: rerun the same command to go on")


def _by_bound(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda row: (row.log10_tight, row.name))


def _ignore(event: Event) -> None:
    """The default on_event: no progress reporting."""


def write_results(result: SweepResult) -> None:
    """results.csv and results.json (one row per run) and frontier.png, each written atomically."""
    files = result.files
    atomic_write(files["csv"], lambda tmp: _write_csv(result.rows, tmp))
    atomic_write(files["json"], lambda tmp: tmp.write_text(strict_json(result.to_dict()) + "\n"))
    plot_frontier(result.rows, files["plot"])


def _write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def _figure_class() -> type:
    try:
        # The object-oriented Figure draws straight to a file: no pyplot state, no display backend.
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("sweep plots frontier.png with matplotlib: pip install 'lipcli[plot]'") from None
    return Figure


def plot_frontier(rows: list[Row], path: str | Path) -> Path:
    """Validation accuracy and loss against log10 tight bound: a line per (optimizer, method), baselines dashed."""
    fig = _figure_class()(figsize=(12, 4.8))
    panels = fig.subplots(1, 2)
    lines: dict[tuple[str, str], list[Row]] = {}
    for row in _by_bound([r for r in rows if not r.baseline and math.isfinite(r.log10_tight)]):
        lines.setdefault((row.optimizer, row.method), []).append(row)
    for ax, (metric, label) in zip(panels, PANELS, strict=True):
        for (optimizer, method), line in lines.items():
            ax.plot([r.log10_tight for r in line], [getattr(r, metric) for r in line], marker="o",
                    label=f"{optimizer} + {method}")  # fmt: skip
        for row in (r for r in rows if r.baseline):
            ax.axhline(getattr(row, metric), color="gray", linestyle="--", label=f"{row.name} (no bound)")
        ax.set_xlabel("log10 certified Lipschitz bound (tight)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if panels[0].get_legend_handles_labels()[0]:  # no finished run: no lines, and an empty legend warns
        panels[0].legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
