"""The `lipcli` command line: parse options, call the library, render rich tables or one JSON object.

Exit codes: 0 success; 1 the job ran but failed (diverged, a --fail-above gate); 2 bad input (unknown
preset, unreadable file, invalid option values): a lipcli.errors.UserError, printed as one line; 130
interrupted (Ctrl-C, the shell's 128 + SIGINT; training keeps its last checkpoint). Any other exception
is a bug in lipcli or a library: it exits 1 with its traceback, to be reported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from . import render
from .cli_parsing import (
    OneLineUsageErrors,
    check_device,
    comma_floats,
    comma_list,
    fail,
    forwarded_args,
    optimizer_values,
)
from .constraints import METHODS
from .errors import UserError
from .files import check_writable
from .models import ARCHITECTURES
from .optim import OPTIMIZERS
from .precision import DTYPES
from .presets import DEFAULT_PRESET, apply_overrides, available, load_preset, parse_set_options
from .projection import ENFORCING

app = typer.Typer(
    cls=OneLineUsageErrors,
    help="Train transformers with enforced Lipschitz bounds, then certify, attack and profile them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Bad input the user can fix: one line, exit 2. Anything else is a bug and shows its traceback (exit 1).
USER_ERRORS = (UserError,)
INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it and as typer exits for every other command


_D = load_preset(DEFAULT_PRESET).train
# Help text names what the registries hold (string annotations cannot hold the joins themselves).
_METHODS, _OPTIMIZERS, _DTYPES = ", ".join(METHODS), ", ".join(OPTIMIZERS), ", ".join(DTYPES)
_ARCHS, _PROJECTIONS = ", ".join(ARCHITECTURES), ", ".join(ENFORCING)
_BASELINES = " and ".join(load_preset(DEFAULT_PRESET).baselines)
_PRESETS = ", ".join(available())


@app.command()
def train(
    ctx: typer.Context,
    preset: Annotated[
        str, typer.Option(help=f"Preset name ({_PRESETS}; `lipcli presets` describes them) or path to a .toml file.")
    ] = DEFAULT_PRESET,
    method: Annotated[
        str | None,
        typer.Option(help=f"Weight constraint: {_METHODS} (preset: {_D.method})."),
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
            help=f"{_OPTIMIZERS} (muon-adamw: Muon on hidden matrices, AdamW at train.adamw_lr on "
            f"embedding, head and gains: modded-nanogpt's split) (preset: {_D.optimizer})."
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
            "into the bound); model.content_heads, model.content_layers (which heads read content and pay for it); "
            "model.position_bias, model.content_bias (learned, alibi or none), model.content_bias_limit, "
            "model.mlp_gain, model.bias, model.activation (gelu or groupsort), model.group_size (free: they leave "
            "the Lipschitz constant unchanged); "
            "train.caps (per-group caps; a name the model does not declare is refused with the model's list), "
            "train.lr_mult, train.blocks_mass, train.embed_inflation, train.warmup, train.schedule; "
            "train.anneal_from='{\"softmax_scale\": 8}' with train.anneal_start / train.anneal_end (steps): "
            "train at those scales first, end at the model's own (what the checkpoint keeps and certify bounds).",
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
    from .distributed import check_launch, current_world, run_torchrun
    from .files import one_line
    from .training import TrainingError, TrainingInterrupted, certified_summary, default_out, validate
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
        path = out or default_out(chosen)
        if launching:
            check_launch(nproc, t.device)
            validate(chosen, world_size=nproc)
        else:
            with render.TrainProgress(enabled=not (quiet or as_json) and world.is_main) as progress:
                result = run_training(chosen, path, resume=resume, on_event=progress.on_event)
    except TrainingInterrupted as exc:
        raise fail(where + str(exc), INTERRUPTED) from None
    except KeyboardInterrupt:
        raise fail(
            f"{where}interrupted before the first training step; no checkpoint was changed", INTERRUPTED
        ) from None
    except TrainingError as exc:
        raise fail(where + str(exc), 1) from None
    except USER_ERRORS as exc:
        raise fail(where + str(exc), 2) from None
    except Exception as exc:
        if world.size == 1:
            raise
        # One line naming the rank and the cause; torchrun then stops the other ranks.
        raise fail(f"{where}{type(exc).__name__}: {one_line(exc)}", 1) from None
    if launching:
        raise typer.Exit(run_torchrun(nproc, forwarded_args(ctx, drop="nproc")))
    if not world.is_main:
        return
    summary = certified_summary(chosen, result)
    if as_json:
        render.print_json(summary)
        return
    render.train_summary(summary)


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
        raise fail(f"--fail-above must be a finite number > 0, got {fail_above}", 2)
    try:
        report = certify(checkpoint_path, power_iters)
    except USER_ERRORS as exc:
        raise fail(str(exc), 2) from None
    # Compared in log space with 4 ulps to spare: rounding may fail a gate near its threshold, never pass one.
    failed = fail_above is not None and (report.log10_bound + 4 * math.ulp(report.log10_bound) > math.log10(fail_above))
    if as_json:
        render.print_json({**report.to_dict(), "fail_above": fail_above, "passed": not failed})
    else:
        render.certificate(report)
    if failed:
        render.stderr.print(
            f"bound {render.fmt_bound(report.log10_bound)} exceeds --fail-above {fail_above:g}", soft_wrap=True
        )
        raise typer.Exit(1)


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
    from .activations import compare, fp8_check, plot, profile
    from .checkpoint import load

    try:
        check_device(device)
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
        raise fail(str(exc), 2) from None
    if as_json:
        rows = [{**p.to_dict(), "fp8_check": c and c.to_dict()} for p, c in zip(profiles, checks, strict=True)]
        plot_file = str(plot_path) if plot_path is not None else None
        render.print_json({"checkpoints": rows, "comparison": comparison and comparison.to_dict(), "plot": plot_file})
        return
    render.activation_profiles(profiles, checks, comparison, plot_path)


@app.command("convert")
def convert(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="A .safetensors, .pt/.pth or reference .npz file.")],
    dst: Annotated[
        Path, typer.Argument(metavar="DST", help="The .safetensors or .pt/.pth file to write (never SRC itself).")
    ],
    to: Annotated[str | None, typer.Option(help="safetensors or pt (default: from DST's extension).")] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help=f"{_DTYPES} (fp8 with a per-tensor scale); default: the source's."),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help=f'Config for a bare state dict: JSON (or a JSON file) {{"arch": ..., model fields}}; archs: {_ARCHS}.'
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Config for a bare state dict from a preset; vocab and width from the tensors.")
    ] = None,
    project: Annotated[
        str | None,
        typer.Option(help=f"Project every weight matrix onto --sigma-max: {_PROJECTIONS}."),
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
        raise fail(str(exc), 2) from None
    if as_json:
        render.print_json(result.to_dict())
        return
    render.conversion(result)


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
        check_device(device)
        if plot_path is not None:
            check_writable(plot_path, "--plot")  # before the attack, not after it
        report = robustness(checkpoint_path, parse_eps(eps), norm=norm, attack=attack, steps=steps, alpha=alpha,
                            restarts=restarts, n=n, data=data, seed=seed, device=device)  # fmt: skip
        if plot_path is not None:
            render.write_plot(lambda: plot(report, plot_path), plot_path)
    except SoundnessError as exc:
        raise fail(str(exc), 1) from None
    except USER_ERRORS as exc:
        raise fail(str(exc), 2) from None
    if as_json:
        render.print_json({**report.to_dict(), "plot": str(plot_path) if plot_path is not None else None})
        return
    render.attack(report, plot_path)


@app.command("presets")
def presets_command(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the named presets."""
    rows = {name: load_preset(name) for name in available()}
    if as_json:
        render.print_json({n: {"arch": p.arch, "description": p.description} for n, p in rows.items()})
        return
    render.presets(rows, DEFAULT_PRESET)


@app.command("sweep")
def sweep_command(
    out: Annotated[
        Path, typer.Option(help="Sweep directory: runs/, points/, results.csv, results.json and frontier.png.")
    ],
    preset: Annotated[
        str, typer.Option(help=f"Preset name ({_PRESETS}; `lipcli presets` describes them) or path to a .toml file.")
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
            f"`baselines` ({DEFAULT_PRESET}: {_BASELINES})."
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
        raise fail("choose one of --baseline-preset and --no-baseline", 2)
    progress = render.SweepProgress(enabled=not as_json)
    try:
        grid = (comma_list(optimizer), comma_list(method), comma_floats(sigma_max, "--sigma-max"))
        overrides = parse_set_options(set_ or [])
        with progress:
            decays = comma_floats(decay, "--decay") if decay is not None else None
            lrs = optimizer_values(lr, "--lr") if lr is not None else None
            result = sweep(preset, *grid, out, steps=steps, decays=decays, lrs=lrs, overrides=overrides,
                           baseline=baseline_preset or baseline, jobs=jobs, on_event=progress.on_event)  # fmt: skip
    except TrainingError as exc:
        raise fail(str(exc), 1) from None
    except USER_ERRORS as exc:
        raise fail(str(exc), 2) from None
    if as_json:
        render.print_json(result.to_dict())
    else:
        render.sweep(result)
    if result.failed:
        names = ", ".join(f.name for f in result.failed)
        raise fail(f"{len(result.failed)} run(s) failed: {names} (rerun the same command to retry them)", 1)


def main() -> None:
    app()
