"""What the CLI shows: rich tables and progress bars on the terminal, or one JSON object for scripts.

Every function here takes a result the library returned and prints it; none computes anything. Progress
bars go to stderr, so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import UserError
from .files import strict_json

if TYPE_CHECKING:  # the result types only: importing them here would load their modules on every command
    from .activations import Comparison, Fp8Check, Profile
    from .attack import AttackReport
    from .certification import CertifyReport
    from .convert import ConvertResult
    from .presets import Preset
    from .sweep import SweepResult

stdout = Console()
stderr = Console(stderr=True)


def print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(strict_json(obj) + "\n")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def fmt_bound(log10_bound: float) -> str:
    if log10_bound == -math.inf:
        return "0"  # a constant map (e.g. a zero head)
    if not math.isfinite(log10_bound):
        return "unbounded"
    return f"{10**log10_bound:.4g}" if log10_bound < 6 else f"10^{log10_bound:.1f}"


class EventBar:
    """A rich progress bar with a status field, fed by library events (on stderr, so --json stays clean)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.enabled = enabled
        self.task = None
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            disable=not enabled,
        )

    def __enter__(self) -> EventBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


class TrainProgress(EventBar):
    """The trainer's bar: loss, accuracy, largest norm and throughput as they come."""

    def __init__(self, enabled: bool) -> None:
        super().__init__("train", enabled)
        self.fields: dict[str, str] = {"loss": "-", "acc": "-", "sigma": "-", "tok/s": "-"}

    def on_event(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if event["type"] == "start":
            self.task = self.progress.add_task("train", total=event["steps"], completed=event["step"], status="")
            return
        if event["type"] == "step":
            if event["loss"] is not None:
                self.fields["loss"] = f"{event['loss']:.3f}"
            self.fields["tok/s"] = f"{event['tokens_per_s']:.0f}"
        if event["type"] == "eval":
            self.fields["acc"] = f"{event['val_acc']:.1%}"
            self.fields["sigma"] = f"{event['max_sigma']:.4f}"
            self.progress.console.print(
                f"step {event['step']}: val loss {event['val_loss']:.4f}, val acc {event['val_acc']:.2%}, "
                f"max sigma {event['max_sigma']:.4f}"
            )
        status = " ".join(f"{k} {v}" for k, v in self.fields.items())
        self.progress.update(self.task, completed=event["step"], status=status)


class SweepProgress(EventBar):
    """One bar over every training step of the sweep and one line per finished run (on stderr)."""

    def __init__(self, enabled: bool) -> None:
        super().__init__("sweep", enabled)
        self.steps_per_run = 0
        self.runs = 0
        self.finished = 0
        self.steps_done: dict[str, int] = {}

    def on_event(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        kind, point = event["type"], event.get("point", "")
        if kind == "sweep_start":
            self.steps_per_run, self.runs = event["steps"], len(event["todo"])
            self.task = self.progress.add_task("sweep", total=self.steps_per_run * self.runs, status="")
        elif kind in ("start", "step"):
            # A resumed run starts part-way; events can only move a run forward.
            self.steps_done[point] = max(self.steps_done.get(point, 0), event["step"])
        elif kind == "point_done":
            self._finished_line(event["row"], event["cached"])
        elif kind == "point_failed":
            self.finished += 1
            self.steps_done[point] = self.steps_per_run
            message = f"{point}: failed: {event['error']}"
            self.progress.console.print(message, style="red", markup=False, highlight=False, soft_wrap=True)
        if self.task is not None:
            status = f"{self.finished}/{self.runs} runs"
            self.progress.update(self.task, completed=sum(self.steps_done.values()), status=status)

    def _finished_line(self, row: dict[str, Any], cached: bool) -> None:
        if not cached:
            self.finished += 1
            self.steps_done[row["name"]] = self.steps_per_run
        self.progress.console.print(
            f"{row['name']}: val acc {row['val_acc']:.2%}, val loss {row['val_loss']:.4g}, "
            f"bound {fmt_bound(row['log10_tight'])}" + (" (done earlier)" if cached else f", {row['wall_s']:.1f} s"),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def train_summary(summary: dict[str, Any]) -> None:
    """The run and its certified bound, one row per field."""
    # Escaped: a path or preset name may contain [brackets], which rich would read as markup.
    table = Table(title=escape(f"lipcli train: {summary['preset']}"), show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # a long path wraps whole instead of ending in "..."
    for key in ("checkpoint", "method", "optimizer", "sigma_max", "step", "val_loss", "val_acc", "max_sigma",
                "log10_bound", "wall_s", "tokens_per_s", "peak_memory_mb"):  # fmt: skip
        table.add_row(key, escape(fmt(summary.get(key))))
    table.add_row("certified bound", f"{fmt_bound(summary['log10_bound'])} ({summary['bound_norm']})")
    stdout.print(table)


def certificate(report: CertifyReport) -> None:
    # Paths and names are printed as text, never read as rich markup (a path may hold [brackets]).
    table = Table(title=escape(f"lipcli certify: {report.path}"))
    for column in ("module", "weight norms", "L paper", "L tight", "running paper", "running tight"):
        table.add_column(column, justify="left" if column in ("module", "weight norms") else "right")
    for row in report.rows:
        norms = " ".join(f"{k}={v:.3g}" for k, v in row.terms.items() if k.startswith("n"))
        table.add_row(
            escape(row.name),
            norms,
            fmt_bound(row.log10_paper),
            fmt_bound(row.log10_tight),
            fmt_bound(row.log10_running_paper),
            fmt_bound(row.log10_running_tight),
        )
    stdout.print(table)
    if report.unbounded_reason:
        stdout.print(f"[bold]unbounded:[/] {escape(report.unbounded_reason)}")
    stdout.print(
        f"bound (tight): [bold]{fmt_bound(report.log10_tight)}[/]   paper: {fmt_bound(report.log10_paper)}   "
        f"norms: {escape(report.norm_method)}   {report.seconds:.2f} s"
    )
    for label, text in (("domain", report.domain), ("norm", report.norm_pair), ("arithmetic", report.arithmetic)):
        stdout.print(f"{label}: {escape(text)}", highlight=False, soft_wrap=True)
    if report.low_precision:
        stdout.print(
            f"[yellow]warning:[/] weights stored in {report.stored_dtype}: the bound holds for exact arithmetic on "
            f"them; a {report.stored_dtype} forward pass adds rounding noise beyond it",
            highlight=False,
            soft_wrap=True,
        )
    for name, (recorded, measured) in report.disagreements.items():
        stdout.print(f"[yellow]metadata disagrees:[/] {escape(name)} recorded {recorded:.6g}, measured {measured:.6g}")


def activation_profiles(
    profiles: list[Profile], checks: list[Fp8Check | None], comparison: Comparison | None, plot_path: Path | None
) -> None:
    """One table per checkpoint, its fp8 check, and the comparison between checkpoints."""
    from .activations import LIMITS  # the format limits the columns are headed by

    for p, check in zip(profiles, checks, strict=True):
        table = Table(title=escape(f"lipcli activations: {p.checkpoint} ({p.arch}, {p.method or 'method unknown'})"))
        table.add_column("site", no_wrap=True, min_width=max(len(s.site) for s in p.sites))
        formats = ("e4m3", "e5m2")
        for column in ("max |x|", "rms", "p99.9", *(f"max/{LIMITS[f]:g} {f}" for f in formats)):
            table.add_column(column, justify="right")
        for s in p.sites:
            ratios = [f"{s.headroom[f]:.3g}" + (" [bold red]OVER[/]" if f in s.exceeds else "") for f in formats]
            table.add_row(escape(s.site), f"{s.max_abs:.4g}", f"{s.rms:.4g}", f"{s.p999:.4g}", *ratios)
        stdout.print(table)
        peak = f"peak {p.max_abs:.4g} at {p.peak.site}; {p.batches} batches, {p.samples} samples of {p.source}"
        stdout.print(peak, markup=False, highlight=False)
        if check is not None:
            stdout.print(
                f"fp8 e4m3 check ({check.layers} linear layers, scale 1): val loss {check.val_loss:.4f} -> "
                f"{check.fp8_val_loss:.4f} ({check.loss_change:+.4f}), acc {check.val_acc:.2%} -> "
                f"{check.fp8_val_acc:.2%}; saturated {check.clamped_inputs} inputs, {check.clamped_weights} weights",
                markup=False,
                highlight=False,
            )
    if comparison is not None:
        table = Table(title=escape(f"max |entry| relative to {comparison.reference}"))
        table.add_column("checkpoint", overflow="fold")
        for column in ("arch", "method", "max |x|", "peak site", "ratio"):
            table.add_column(column, justify="right" if column in ("max |x|", "ratio") else "left")
        for row in comparison.rows:
            # The method comes from the checkpoint's metadata: any text, so escaped like the paths.
            cells = (escape(row.checkpoint), row.arch, escape(row.method or "-"), f"{row.max_abs:.4g}",
                     escape(row.peak_site))  # fmt: skip
            table.add_row(*cells, f"{row.ratio:.4g}x")
        stdout.print(table)
    if plot_path is not None:
        stdout.print(f"plot: {plot_path}", markup=False, highlight=False, soft_wrap=True)


def conversion(result: ConvertResult) -> None:
    """What was converted, and how the norms and the val loss moved."""
    table = Table(title="lipcli convert", show_header=False)
    rows = {
        "src": f"{result.src} ({result.src_format})",
        "dst": f"{result.dst} ({result.dst_format})",
        "arch": result.arch,
        "dtype": result.dtype,
        "tensors": f"{result.tensors} ({result.parameters:,} values)",
    }
    if result.projection is not None:
        rows["projection"] = f"{result.projection} at sigma_max {result.sigma_max:g}"
        rows["max sigma before/after"] = f"{result.max_sigma_before:.4g} -> {result.max_sigma_after:.4g}"
    if result.val_loss_before is not None:
        rows["val loss before/after"] = f"{result.val_loss_before:.4f} -> {result.val_loss_after:.4f}"
    for key, value in rows.items():
        table.add_row(key, escape(value))  # paths may contain [brackets]
    stdout.print(table)
    if result.eval_note:
        stdout.print(result.eval_note, markup=False, highlight=False)


def attack(report: AttackReport, plot_path: Path | None) -> None:
    """Clean, attacked and certified accuracy per eps, then how they were measured."""
    table = Table(title=escape(f"lipcli attack: {report.checkpoint} ({report.arch}, {report.attack} {report.norm})"))
    for column in ("eps", "clean", "attacked", "drop", "certified", "mean |δ|", "max |δ|", "radius"):
        table.add_column(column, justify="right")
    for r in report.rows:
        accuracies = (f"{v:.2%}" for v in (r.clean_acc, r.adv_acc, r.drop, r.certified_acc))
        table.add_row(f"{r.eps:g}", *accuracies, f"{r.mean_norm:.4g}", f"{r.max_norm:.4g}", f"{r.radius:.4g}")
    stdout.print(table)
    lines = [
        f"|δ| and radius: {report.certificate_norm}; threat set: {report.threat}",
        f"certified: correct and {report.rule}, L = {fmt_bound(report.log10_bound)}; "
        f"{report.predictions} predictions from {report.source}; "
        f"{report.steps} steps, {report.restarts} restart(s), {report.seconds:.1f} s",
    ]
    for line in [*lines, report.note or "", f"plot: {plot_path}" if plot_path is not None else ""]:
        if line:
            stdout.print(line, markup=False, highlight=False)


def presets(rows: dict[str, Preset], default: str) -> None:
    """The named presets, the default marked."""
    table = Table("preset", "arch", "description")
    for name, p in rows.items():
        table.add_row(escape(name) + (" (default)" if name == default else ""), p.arch, escape(p.description))
    stdout.print(table)


def sweep(result: SweepResult) -> None:
    table = Table(title=escape(f"lipcli sweep: {result.out_dir}"))
    table.add_column("run", no_wrap=True)
    for column in ("sigma", "L tight", "L paper", "val acc", "val loss", "max |x|", "wall s"):
        table.add_column(column, justify="right")
    for row in result.rows:
        bounds = (fmt_bound(row.log10_tight), fmt_bound(row.log10_paper))
        metrics = (f"{row.val_acc:.2%}", f"{row.val_loss:.4g}", f"{row.max_activation:.4g}", f"{row.wall_s:.1f}")
        table.add_row(escape(row.name), fmt(row.sigma_max), *bounds, *metrics)
    stdout.print(table)
    lines = [f"skipped {s.optimizer} + {s.method}: {s.reason}" for s in result.skipped]
    lines += [f"note: {note}" for note in result.notes]
    lines += [f"failed {f.name}: {f.error}" for f in result.failed]
    lines.append("wrote " + ", ".join(str(path) for path in result.files.values()))
    for line in lines:
        stdout.print(line, markup=False, highlight=False, soft_wrap=True)


def write_plot(write: Callable[[], object], path: Path) -> None:
    """matplotlib writes straight to ``path``: a folder that went away or turned read-only is the user's to fix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as atomic_write does for every other output
        write()
    except OSError as exc:
        raise UserError(f"--plot {path}: {exc.strerror or exc}") from None
