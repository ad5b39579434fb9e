"""The `lipcli` command line: parse options, call the library, render rich tables or one JSON object.

Exit codes: 0 success; 1 the job ran but failed (diverged, a --fail-above gate); 2 bad input (unknown
preset, unreadable file, invalid option values): a lipcli.errors.UserError, printed as one line; 130
interrupted (Ctrl-C, the shell's 128 + SIGINT; training keeps its last checkpoint). Any other exception
is a bug in lipcli or a library: it exits 1 with its traceback, to be reported.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from .errors import UserError
from .files import check_writable, strict_json
from .presets import DEFAULT_PRESET, apply_overrides, available, load_preset, parse_set_options


class _OneLineUsageErrors(TyperGroup):
    """click shows a usage error as usage, a hint and a boxed message; lipcli's rule is one line on stderr, exit 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> typer.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: typer.Context) -> Any:
        with _one_line_usage_errors():  # the subcommand parses its options in here
            return super().invoke(ctx)


# typer vendors click: its BadParameter derives from the UsageError that every parsing error is.
_UsageError: type[Exception] = typer.BadParameter.__base__


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except _UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `lipcli`: the help is the answer
            raise
        where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        raise _fail(exc.format_message() + where, exc.exit_code) from None


app = typer.Typer(
    cls=_OneLineUsageErrors,
    help="Train transformers with enforced Lipschitz bounds, then certify, attack and profile them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console()
stderr = Console(stderr=True)
# Bad input the user can fix: one line, exit 2. Anything else is a bug and shows its traceback (exit 1).
USER_ERRORS = (UserError,)
INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it and as typer exits for every other command


def _fail(message: str, code: int) -> typer.Exit:
    # Escaped: messages hold paths and library text, and rich would read [brackets] in them as markup.
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(strict_json(obj) + "\n")


_D = load_preset(DEFAULT_PRESET).train


@app.command()
def train(
    ctx: typer.Context,
    preset: Annotated[
        str, typer.Option(help="Preset name (see `lipcli presets`) or path to a .toml file.")
    ] = DEFAULT_PRESET,
    method: Annotated[
        str | None,
        typer.Option(
            help="Weight constraint: none, wd, spec-wd, normalize, hammer, softcap, hardcap, svd "
            f"(preset: {_D.method})."
        ),
    ] = None,
    sigma_max: Annotated[
        float | None,
        typer.Option(
            help=f"Cap on every weight matrix's RMS->RMS operator norm (the paper's w_max) (preset: {_D.sigma_max:g})."
        ),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help="muon, adamw, or muon-adamw (Muon on hidden matrices, AdamW at train.adamw_lr on embedding, "
            f"head and gains: modded-nanogpt's split) (preset: {_D.optimizer})."
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help=f"Peak learning rate (preset: {_D.lr:g}).")] = None,
    wd: Annotated[float | None, typer.Option(help=f"Decoupled weight decay (preset: {_D.wd:g}).")] = None,
    steps: Annotated[int | None, typer.Option(help=f"Optimizer steps (preset: {_D.steps}).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"Sequences (or images) per step (preset: {_D.batch_size}).")
    ] = None,
    context: Annotated[int | None, typer.Option(help="Context length in tokens (preset: 128).")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Text file, dataset name, token-shard glob, or digits/cifar10 (preset: tinyshakespeare); "
            "names resolve through $LIPCLI_DATA_DIR, the cache, then the `datasets` hub."
        ),
    ] = None,  # fmt: skip
    tokenizer: Annotated[
        str | None,
        typer.Option(help="char (a vocabulary of the corpus's characters) or gpt2 (tiktoken BPE) (preset: char)."),
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help=f"Share of the text held out for validation (preset: {_D.val_fraction:g}).")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help=f"Evaluate and checkpoint every N steps (preset: {_D.eval_every}).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Checkpoint path (default runs/<preset>-<method>-<sigma>.safetensors).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run at --out from its last committed save (same model and optimizer settings)."
        ),
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for init and data order (preset: 0).")] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32 or bf16 (autocast) (preset: fp32).")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override any preset field, e.g. --set model.final_scale=8 --set train.caps='{\"head\": 4}'. "
            "Where the Lipschitz budget goes (all counted by certify; README 'Spending the Lipschitz budget'): "
            "model.final_scale, model.softmax_scale, model.attn_out_scale, model.residual_scale (these multiply "
            "into the bound); model.position_bias, model.mlp_gain, model.bias, model.activation (gelu or "
            "groupsort), model.group_size (free: they leave the Lipschitz constant unchanged); "
            "train.caps (per-group caps: embed, attn_qk, attn_v, attn_out, mlp_in, mlp_out, head), "
            "train.lr_mult, train.blocks_mass, train.embed_inflation, train.warmup, train.schedule.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            help="Train on N processes (one per GPU, or N CPU processes): starts torchrun with the other options."
        ),
    ] = None,
) -> None:
    """Train a Lipschitz-constrained model (default: LipschitzGPT on tiny Shakespeare) and checkpoint it.

    Under torchrun (`torchrun --nproc_per_node N -m lipcli train ...`) each process trains its slice of
    every batch with DDP and only rank 0 writes and prints.
    """
    from .distributed import current_world
    from .files import one_line
    from .training import TrainingError, TrainingInterrupted, validate
    from .training import train as run_training

    world = current_world()
    where = f"{world.describe()}: " if world.size > 1 else ""  # names the failing process in a multi-process job
    launching = nproc is not None and nproc != 1

    options = {"method": method, "sigma_max": sigma_max, "optimizer": optimizer, "lr": lr, "wd": wd, "steps": steps,
               "batch_size": batch_size, "data": data, "tokenizer": tokenizer, "val_fraction": val_fraction,
               "eval_every": eval_every, "seed": seed, "device": device, "dtype": dtype,
               "compile": compile}  # fmt: skip
    try:
        chosen = load_preset(preset)
        overrides = {f"train.{k}": v for k, v in options.items() if v is not None}
        if context is not None:
            overrides["model.context"] = context
        chosen = apply_overrides(chosen, {**overrides, **parse_set_options(set_ or [])})
        t = chosen.train
        path = out or Path("runs") / f"{chosen.name}-{t.method}-{t.sigma_max:g}.safetensors"
        if launching:
            _check_launch(nproc, t.device)
            validate(chosen, world_size=nproc)
        else:
            with _TrainProgress(enabled=not (quiet or as_json) and world.is_main) as progress:
                result = run_training(chosen, path, resume=resume, on_event=progress.on_event)
    except TrainingInterrupted as exc:
        raise _fail(where + str(exc), INTERRUPTED) from None
    except KeyboardInterrupt:
        raise _fail(
            f"{where}interrupted before the first training step; no checkpoint was changed", INTERRUPTED
        ) from None
    except TrainingError as exc:
        raise _fail(where + str(exc), 1) from None
    except USER_ERRORS as exc:
        raise _fail(where + str(exc), 2) from None
    except Exception as exc:
        if world.size == 1:
            raise
        # One line naming the rank and the cause; torchrun then stops the other ranks.
        raise _fail(f"{where}{type(exc).__name__}: {one_line(exc)}", 1) from None
    if launching:
        raise typer.Exit(_run_torchrun(nproc, _forwarded_args(ctx, drop="nproc")))
    if not world.is_main:
        return
    from .certification import certify

    bound = certify(result.checkpoint)
    summary = {"checkpoint": str(result.checkpoint), "preset": chosen.name, "method": t.method,
               "optimizer": t.optimizer, "sigma_max": t.sigma_max, **result.metrics,
               "log10_bound": bound.log10_bound, "log10_bound_paper": bound.log10_paper,
               "bound_norm": bound.norm_pair}  # fmt: skip
    if as_json:
        _print_json(summary)
        return
    # Escaped: a path or preset name may contain [brackets], which rich would read as markup.
    table = Table(title=escape(f"lipcli train: {chosen.name}"), show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # a long path wraps whole instead of ending in "..."
    for key in ("checkpoint", "method", "optimizer", "sigma_max", "step", "val_loss", "val_acc", "max_sigma",
                "log10_bound", "wall_s", "tokens_per_s", "peak_memory_mb"):  # fmt: skip
        table.add_row(key, escape(_fmt(summary.get(key))))
    table.add_row("certified bound", f"{_fmt_bound(bound.log10_bound)} ({bound.norm_pair})")
    stdout.print(table)


def _check_launch(nproc: int, device: str) -> None:
    """Reject a launch that cannot work before starting torchrun (exit 2, as for any bad input)."""
    import torch

    from .distributed import current_world
    from .training import resolve_device

    if nproc < 1:
        raise UserError(f"--nproc must be >= 1 (got {nproc})")
    if current_world().size > 1:
        raise UserError("--nproc starts torchrun itself; drop it when launching with torchrun")
    gpus = torch.cuda.device_count()
    if resolve_device(device).type == "cuda" and nproc > gpus:
        raise UserError(f"--nproc {nproc} needs {nproc} GPUs (one per process); torch sees {gpus}")


def _forwarded_args(ctx: typer.Context, drop: str) -> list[str]:
    """The options given on this command line, except ``drop``, written back as arguments for torchrun's workers."""
    args: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        # By name: typer may vendor its own copy of click's ParameterSource.
        if param.name == drop or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            args.append(param.opts[0] if value else param.secondary_opts[0])
            continue
        for item in value if param.multiple else [value]:
            args += [param.opts[0], str(item)]
    return args


def _run_torchrun(nproc: int, args: list[str]) -> int:
    """``python -m torch.distributed.run`` with ``nproc`` workers of ``lipcli train args``; its exit code."""
    import subprocess

    # --standalone: a private rendezvous on a free port, so two jobs on one machine never collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "lipcli", "train", *args]  # fmt: skip
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached torchrun and its workers too: let them stop, checkpoint kept, and report.
        return process.wait()


class _EventBar:
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

    def __enter__(self) -> _EventBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


class _TrainProgress(_EventBar):
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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _fmt_bound(log10_bound: float) -> str:
    if log10_bound == -math.inf:
        return "0"  # a constant map (e.g. a zero head)
    if not math.isfinite(log10_bound):
        return "unbounded"
    return f"{10**log10_bound:.4g}" if log10_bound < 6 else f"10^{log10_bound:.1f}"


@app.command("certify")
def certify_command(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A lipcli .safetensors checkpoint.")],
    power_iters: Annotated[
        int | None,
        typer.Option(
            help="Faster: K power-iteration steps per matrix, each estimate proved an upper bound by a Cholesky "
            "factorization (falling back to exact where it is not), instead of exact eigenvalues."
        ),
    ] = None,
    fail_above: Annotated[
        float | None, typer.Option(help="Exit 1 when the tightest sound bound exceeds this (a CI gate).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Prove an upper bound on the model's Lipschitz constant from its stored weights (paper and tight)."""
    from .certification import certify

    if fail_above is not None and not (math.isfinite(fail_above) and fail_above > 0):
        raise _fail(f"--fail-above must be a finite number > 0, got {fail_above}", 2)
    try:
        report = certify(checkpoint_path, power_iters)
    except USER_ERRORS as exc:
        raise _fail(str(exc), 2) from None
    # Compared in log space with 4 ulps to spare: rounding may fail a gate near its threshold, never pass one.
    failed = fail_above is not None and (report.log10_bound + 4 * math.ulp(report.log10_bound) > math.log10(fail_above))
    if as_json:
        _print_json({**report.to_dict(), "fail_above": fail_above, "passed": not failed})
    else:
        _render_certificate(report)
    if failed:
        stderr.print(f"bound {_fmt_bound(report.log10_bound)} exceeds --fail-above {fail_above:g}", soft_wrap=True)
        raise typer.Exit(1)


def _render_certificate(report) -> None:
    # Paths and names are printed as text, never read as rich markup (a path may hold [brackets]).
    table = Table(title=escape(f"lipcli certify: {report.path}"))
    for column in ("module", "weight norms", "L paper", "L tight", "running paper", "running tight"):
        table.add_column(column, justify="left" if column in ("module", "weight norms") else "right")
    for row in report.rows:
        norms = " ".join(f"{k}={v:.3g}" for k, v in row.terms.items() if k.startswith("n"))
        table.add_row(
            escape(row.name),
            norms,
            _fmt_bound(row.log10_paper),
            _fmt_bound(row.log10_tight),
            _fmt_bound(row.log10_running_paper),
            _fmt_bound(row.log10_running_tight),
        )
    stdout.print(table)
    if report.unbounded_reason:
        stdout.print(f"[bold]unbounded:[/] {escape(report.unbounded_reason)}")
    stdout.print(
        f"bound (tight): [bold]{_fmt_bound(report.log10_tight)}[/]   paper: {_fmt_bound(report.log10_paper)}   "
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


@app.command("activations")
def activations(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(metavar="CKPT...", help="lipcli checkpoints; with several, the first is the reference."),
    ],
    data: Annotated[
        str | None,
        typer.Option(help="Text file, dataset name or digits/cifar10 instead of the checkpoint's training data."),
    ] = None,
    batches: Annotated[int, typer.Option(help="Validation batches to run.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Sequences (or images) per batch.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the subsample behind the 99.9th percentile.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    fp8: Annotated[
        bool,
        typer.Option("--fp8-check", help="Also rerun the val loss with every linear input and weight in fp8 e4m3."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of max |entry| per site (log scale) with the fp8 limits.")
    ] = None,
) -> None:
    """Where the big numbers live: max, RMS and 99.9th percentile of |activation| per site vs fp8/bf16 limits."""
    from .activations import LIMITS, compare, fp8_check, plot, profile
    from .checkpoint import load

    try:
        _check_device(device)
        if plot_path is not None:
            check_writable(plot_path, "--plot")  # before the profiling, not after it
        profiles, checks = [], []
        for path in checkpoints:
            ckpt = load(path)
            options = {"data": data, "batches": batches, "batch_size": batch_size, "device": device}
            profiles.append(profile(ckpt, seed=seed, **options))
            checks.append(fp8_check(ckpt, **options) if fp8 else None)
        comparison = compare(profiles) if len(profiles) > 1 else None
        if plot_path is not None:
            plot(profiles, plot_path)
    except USER_ERRORS as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        rows = [{**p.to_dict(), "fp8_check": c and c.to_dict()} for p, c in zip(profiles, checks, strict=True)]
        plot_file = str(plot_path) if plot_path is not None else None
        _print_json({"checkpoints": rows, "comparison": comparison and comparison.to_dict(), "plot": plot_file})
        return
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


@app.command("convert")
def convert(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="A .safetensors, .pt/.pth or reference .npz file.")],
    dst: Annotated[
        Path, typer.Argument(metavar="DST", help="The .safetensors or .pt/.pth file to write (never SRC itself).")
    ],
    to: Annotated[str | None, typer.Option(help="safetensors or pt (default: from DST's extension).")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="fp32, bf16, fp16 or fp8-e4m3 (with a per-tensor scale); default: the source's.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help='Config for a bare state dict: JSON (or a JSON file) {"arch": ..., model fields}.'),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Config for a bare state dict from a preset; vocab and width from the tensors.")
    ] = None,
    project: Annotated[
        str | None,
        typer.Option(help="Project every weight matrix onto --sigma-max: svd, hardcap, normalize or softcap."),
    ] = None,
    sigma_max: Annotated[
        float | None, typer.Option(help="Cap on each matrix's RMS->RMS norm for --project (embeddings: unit RMS rows).")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Measure the val loss before/after on this data (with --project: the run's).")
    ] = None,
    eval_batches: Annotated[int, typer.Option(help="Validation batches for the val loss (0: none).")] = 4,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Read a reference .npz (pickle can run code: trusted files only).")
    ] = False,
    npz_checkpoint: Annotated[
        int | None, typer.Option(help="Which weights_checkpoint_K of a reference .npz (default: the last).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Convert between lipcli .safetensors, .pt state dicts and the paper's .npz; cast, or project to certify."""
    from .convert import convert as run_convert

    try:
        result = run_convert(src, dst, to=to, dtype=dtype, config=config, preset=preset, method=project,
                             sigma_max=sigma_max, data=data, eval_batches=eval_batches, allow_pickle=allow_pickle,
                             npz_checkpoint=npz_checkpoint)  # fmt: skip
    except USER_ERRORS as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        _print_json(result.to_dict())
        return
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


@app.command("attack")
def attack_command(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CKPT", help="A lipcli .safetensors checkpoint.")],
    eps: Annotated[
        str,
        typer.Option(
            help="Attack size, or a comma list (one row each): the --norm size on pixels for MLPs; for language "
            "models the certificate's unit, the max per-token RMS of the embedding change."
        ),
    ],
    norm: Annotated[
        str, typer.Option(help="l2 or linf: the threat set (for language models both lie inside the certified ball).")
    ] = "l2",
    attack: Annotated[str, typer.Option(help="pgd, apgd (MLPs) or fgsm (linf), all from torchattacks.")] = "pgd",
    steps: Annotated[int, typer.Option(help="Attack iterations (pgd, apgd).")] = 20,
    alpha: Annotated[
        float | None, typer.Option(help="PGD step in the units of eps (default 2.5 * eps / steps).")
    ] = None,
    restarts: Annotated[int, typer.Option(help="Random restarts; a prediction broken by any of them counts.")] = 1,
    n: Annotated[
        int | None, typer.Option("--n", help="Validation examples (default 256 images or 16 sequences).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Text file, dataset name or digits/cifar10 instead of the checkpoint's training data."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the attacks' random starts.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of clean, attacked and certified accuracy vs eps.")
    ] = None,
) -> None:
    """Accuracy under attack next to certified accuracy: what PGD takes at each eps, and what provably stays."""
    from .attack import SoundnessError, parse_eps, plot, robustness

    try:
        _check_device(device)
        if plot_path is not None:
            check_writable(plot_path, "--plot")  # before the attack, not after it
        report = robustness(checkpoint_path, parse_eps(eps), norm=norm, attack=attack, steps=steps, alpha=alpha,
                            restarts=restarts, n=n, data=data, seed=seed, device=device)  # fmt: skip
        if plot_path is not None:
            _write_plot(lambda: plot(report, plot_path), plot_path)
    except SoundnessError as exc:
        raise _fail(str(exc), 1) from None
    except USER_ERRORS as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        _print_json({**report.to_dict(), "plot": str(plot_path) if plot_path is not None else None})
        return
    table = Table(title=escape(f"lipcli attack: {report.checkpoint} ({report.arch}, {report.attack} {report.norm})"))
    for column in ("eps", "clean", "attacked", "drop", "certified", "mean |δ|", "max |δ|", "radius"):
        table.add_column(column, justify="right")
    for r in report.rows:
        accuracies = (f"{v:.2%}" for v in (r.clean_acc, r.adv_acc, r.drop, r.certified_acc))
        table.add_row(f"{r.eps:g}", *accuracies, f"{r.mean_norm:.4g}", f"{r.max_norm:.4g}", f"{r.radius:.4g}")
    stdout.print(table)
    lines = [
        f"|δ| and radius: {report.certificate_norm}; threat set: {report.threat}",
        f"certified: correct and {report.rule}, L = {_fmt_bound(report.log10_bound)}; "
        f"{report.predictions} predictions from {report.source}; "
        f"{report.steps} steps, {report.restarts} restart(s), {report.seconds:.1f} s",
    ]
    for line in [*lines, report.note or "", f"plot: {plot_path}" if plot_path is not None else ""]:
        if line:
            stdout.print(line, markup=False, highlight=False)


def _check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device; use auto, cpu or cuda") from None


def _write_plot(write: Any, path: Path) -> None:
    """matplotlib writes straight to ``path``: a folder that went away or turned read-only is the user's to fix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as atomic_write does for every other output
        write()
    except OSError as exc:
        raise UserError(f"--plot {path}: {exc.strerror or exc}") from None


@app.command("presets")
def presets_command(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the named presets."""
    rows = {name: load_preset(name) for name in available()}
    if as_json:
        _print_json({n: {"arch": p.arch, "description": p.description} for n, p in rows.items()})
        return
    table = Table("preset", "arch", "description")
    for name, p in rows.items():
        table.add_row(escape(name) + (" (default)" if name == DEFAULT_PRESET else ""), p.arch, escape(p.description))
    stdout.print(table)


@app.command("sweep")
def sweep_command(
    out: Annotated[
        Path, typer.Option(help="Sweep directory: runs/, points/, results.csv, results.json and frontier.png.")
    ],
    preset: Annotated[
        str, typer.Option(help="Preset name (see `lipcli presets`) or path to a .toml file.")
    ] = DEFAULT_PRESET,
    optimizer: Annotated[str, typer.Option(help="Comma list of optimizers.")] = "muon,adamw",
    method: Annotated[
        str,
        typer.Option(help="Comma list of constraint methods; pairs an optimizer cannot run are skipped, with why."),
    ] = "softcap,hardcap,normalize,wd,hammer",
    sigma_max: Annotated[
        str, typer.Option(help="Comma list of caps (RMS->RMS norm); none and wd ignore it and run once.")
    ] = "0.5,1,2,4,8",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps of every run, the baseline's too.")] = None,
    decay: Annotated[
        str | None,
        typer.Option(
            help="Comma list of decay strengths for the wd method, its knob (default: the preset's train.wd)."
        ),
    ] = None,
    lr: Annotated[
        str | None,
        typer.Option(
            help="Learning rate per optimizer, e.g. muon=0.2,adamw=0.003 (default: the preset's for its own "
            "optimizer, muon 0.1 / adamw 0.003 for another)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a preset field in every run, e.g. --set train.lr=0.05.")
    ] = None,
    baseline_preset: Annotated[
        str | None,
        typer.Option(
            help="Unconstrained reference run at the sweep's size, data and steps instead of the preset's own "
            "`baselines` (shakespeare-cpu: shakespeare-baseline and shakespeare-baseline-muon)."
        ),
    ] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Run the baselines too.")] = True,
    jobs: Annotated[int, typer.Option(help="Runs in parallel processes, each with cores/jobs threads.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """The Lipschitz-vs-accuracy frontier: train, certify and profile a grid; rerun the same command to resume."""
    from .sweep import sweep
    from .training import TrainingError

    if baseline_preset is not None and not baseline:
        raise _fail("choose one of --baseline-preset and --no-baseline", 2)
    progress = _SweepProgress(enabled=not as_json)
    try:
        grid = (_comma_list(optimizer), _comma_list(method), _comma_floats(sigma_max, "--sigma-max"))
        overrides = parse_set_options(set_ or [])
        with progress:
            decays = _comma_floats(decay, "--decay") if decay is not None else None
            lrs = _optimizer_values(lr, "--lr") if lr is not None else None
            result = sweep(preset, *grid, out, steps=steps, decays=decays, lrs=lrs, overrides=overrides,
                           baseline=baseline_preset or baseline, jobs=jobs, on_event=progress.on_event)  # fmt: skip
    except TrainingError as exc:
        raise _fail(str(exc), 1) from None
    except USER_ERRORS as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        _print_json(result.to_dict())
    else:
        _render_sweep(result)
    if result.failed:
        names = ", ".join(f.name for f in result.failed)
        raise _fail(f"{len(result.failed)} run(s) failed: {names} (rerun the same command to retry them)", 1)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _optimizer_values(text: str, option: str) -> dict[str, float]:
    """``muon=0.2,adamw=0.003`` as a dict."""
    values = {}
    for item in _comma_list(text):
        name, _, value = item.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"{option} expects OPTIMIZER=NUMBER pairs separated by commas, got {item!r}") from None
    return values


def _comma_floats(text: str, option: str) -> list[float]:
    try:
        return [float(item) for item in _comma_list(text)]
    except ValueError:
        raise UserError(f"{option} expects numbers separated by commas, got {text!r}") from None


class _SweepProgress(_EventBar):
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
            f"bound {_fmt_bound(row['log10_tight'])}" + (" (done earlier)" if cached else f", {row['wall_s']:.1f} s"),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _render_sweep(result) -> None:
    table = Table(title=escape(f"lipcli sweep: {result.out_dir}"))
    table.add_column("run", no_wrap=True)
    for column in ("sigma", "L tight", "L paper", "val acc", "val loss", "max |x|", "wall s"):
        table.add_column(column, justify="right")
    for row in result.rows:
        bounds = (_fmt_bound(row.log10_tight), _fmt_bound(row.log10_paper))
        metrics = (f"{row.val_acc:.2%}", f"{row.val_loss:.4g}", f"{row.max_activation:.4g}", f"{row.wall_s:.1f}")
        table.add_row(escape(row.name), _fmt(row.sigma_max), *bounds, *metrics)
    stdout.print(table)
    lines = [f"skipped {s.optimizer} + {s.method}: {s.reason}" for s in result.skipped]
    lines += [f"note: {note}" for note in result.notes]
    lines += [f"failed {f.name}: {f.error}" for f in result.failed]
    lines.append("wrote " + ", ".join(str(path) for path in result.files.values()))
    for line in lines:
        stdout.print(line, markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    app()
