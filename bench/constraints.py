"""Time each weight constraint against the exact SVD clip, on the matrices a Muon trainer hands over.

For every size ``fan_out x fan_in`` the script builds one matrix as it looks right after a Muon step
under a cap of sigma_max = 1 (RMS->RMS units): a random matrix with singular vectors from QR and a
spread spectrum (linearly from 1 down to 0.05) scaled to RMS->RMS norm exactly 1, plus the step
``lr * msign(G) * rms_scale`` with lr = 0.1 and G Gaussian. It then times
:func:`lipcli.constraints.project` for softcap, hardcap, normalize, hammer, spec-wd and svd (the
exact clip, the reference), and Muon's ``msign`` alone for context:

* softcap gets ``norm_bound = 1 + lr * max_gain(MUON_COEFFS) * 1.05`` (= 1 + 0.1 * 1.2024 * 1.05),
  the bound the optimizer passes it;
* hammer and spec-wd reuse one warm ``state`` dict across calls, as in training (primed by one
  untimed call, so every timed call runs the 4-step warm power iteration);
* every method is warmed up once on a small matrix before timing; then, per size, up to
  ``--repeats`` rounds each time every method once (round-robin, so a burst of load from other
  processes hits all methods alike). A method sits out later rounds once its calls at that size
  have used ``--budget`` seconds (it always gets one), so the runs column says how many calls the
  median is over. On CUDA every call is bracketed by ``torch.cuda.synchronize()``.

Each row reports the median wall time, its ratio to the svd's median at the same size measured in
the same run (below 1: faster than the SVD), and the exact RMS->RMS norm of the result
(float64, the top eigenvalue of the Gram matrix: equal to :func:`lipcli.spectral.rms_norm_exact`
to ~1e-14 and much cheaper on CPU), so the reader sees which methods enforce the cap of 1.
The "guarantee" column is the method's ``enforces`` flag from ``METHODS``.

Run it with ``make bench`` (``.venv/bin/python bench/constraints.py``) or, for example::

    .venv/bin/python bench/constraints.py --sizes 512x512,768x3072 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from lipcli.constraints import METHODS, CapContext, project
from lipcli.spectral import MUON_COEFFS, max_gain, msign, rms_scale

SIGMA_MAX = 1.0
LR = 0.1
# The optimizer's margin on the Newton-Schulz gain (lipcli.optim._GAIN_MARGIN): bf16 rounding headroom.
GAIN_MARGIN = 1.05
# lr * weight decay handed to spec-wd; its cost does not depend on the value.
SPECTRAL_DECAY = 0.01
# The timed methods in table order; "msign" is Muon's orthogonalization alone, not a constraint.
BENCH_METHODS = ("softcap", "hardcap", "normalize", "hammer", "spec-wd", "svd", "msign")
WARM_STATE_METHODS = ("hammer", "spec-wd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row:
    method: str
    size: str
    median_ms: float
    runs: int
    ratio_vs_svd: float | None
    max_rms_norm: float | None  # exact RMS->RMS norm of the result (None for msign)
    guarantee: bool | None  # METHODS[method].enforces (None for msign)
    times_ms: list[float]  # every timed call, in order (JSON only)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'256x256,768x3072' -> [(256, 256), (768, 3072)] as (fan_out, fan_in)."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            fan_out, fan_in = (int(part) for part in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: expected FAN_OUTxFAN_IN, e.g. 768x3072") from None
        if fan_out < 1 or fan_in < 1:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: dimensions must be positive")
        sizes.append((fan_out, fan_in))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def norm_bound(lr: float = LR) -> float:
    """What the Muon optimizer passes softcap: sigma_max + lr * (Newton-Schulz gain with margin)."""
    return SIGMA_MAX + lr * max_gain(MUON_COEFFS) * GAIN_MARGIN


def trainer_matrix(fan_out: int, fan_in: int, device: torch.device, dtype: torch.dtype, seed: int) -> Tensor:
    """A weight at RMS->RMS norm sigma_max with a spread spectrum, plus one Muon step of lr = 0.1."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(fan_out, fan_in)
    q_out, _ = torch.linalg.qr(torch.randn(fan_out, rank, generator=gen, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(fan_in, rank, generator=gen, dtype=torch.float64))
    spectrum = torch.linspace(SIGMA_MAX, 0.05 * SIGMA_MAX, rank, dtype=torch.float64)
    scale = math.sqrt(fan_out / fan_in)  # spectral norm of a [fan_out, fan_in] matrix at RMS->RMS norm 1
    weight = (q_out * spectrum) @ q_in.mT * scale
    grad = torch.randn(fan_out, fan_in, generator=gen)
    step = msign(grad.to(device)) * scale
    return (weight.to(device=device, dtype=torch.float32) + LR * step).to(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_call(method: str, weight: Tensor, bound: float) -> Callable[[], Tensor]:
    """A zero-argument call that runs one method on ``weight`` with the context training would give it."""
    if method == "msign":
        return lambda: msign(weight) * rms_scale(weight)
    if method == "softcap":
        return lambda: project(weight, method, CapContext(SIGMA_MAX, norm_bound=bound))
    if method in WARM_STATE_METHODS:
        state: dict = {}  # one parameter's persistent memory, reused across repeats
        return lambda: project(weight, method, CapContext(SIGMA_MAX, decay=SPECTRAL_DECAY, state=state))
    return lambda: project(weight, method, CapContext(SIGMA_MAX))


def time_once(call: Callable[[], Tensor], device: torch.device) -> tuple[float, Tensor]:
    """Wall time in ms of one call, synchronized on CUDA, and its result."""
    sync(device)
    start = time.perf_counter()
    out = call()
    sync(device)
    return (time.perf_counter() - start) * 1e3, out


def exact_rms_norm(weight: Tensor) -> float:
    """Exact RMS->RMS norm: sigma_1^2 as the top eigenvalue of the smaller Gram matrix, all in float64.

    Agrees with :func:`lipcli.spectral.rms_norm_exact` to ~1e-14 but, on CPU, runs ~20x faster at
    2048x2048 (eigvalsh instead of svdvals), which keeps the check from dominating the run.
    """
    w = weight.detach().to(torch.float64)
    gram = w @ w.mT if w.shape[-2] <= w.shape[-1] else w.mT @ w
    sigma = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).sqrt()
    return float(sigma.max()) / rms_scale(weight)


def warm_up(device: torch.device, dtype: torch.dtype, bound: float) -> None:
    """One call of every method on a small matrix, so library and thread-pool start-up is not timed."""
    weight = trainer_matrix(64, 96, device, dtype, seed=1)
    for method in BENCH_METHODS:
        make_call(method, weight, bound)()
    sync(device)


def run(
    sizes: list[tuple[int, int]],
    repeats: int,
    budget_s: float,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Row], dict[str, float]]:
    bound = norm_bound()
    warm_up(device, dtype, bound)
    rows: list[Row] = []
    input_norms: dict[str, float] = {}
    for index, (fan_out, fan_in) in enumerate(sizes):
        size = f"{fan_out}x{fan_in}"
        weight = trainer_matrix(fan_out, fan_in, device, dtype, seed=index)
        input_norms[size] = exact_rms_norm(weight)
        calls = {method: make_call(method, weight, bound) for method in BENCH_METHODS}
        for method in WARM_STATE_METHODS:
            calls[method]()  # prime the warm start: training's first step runs 16 power iterations, later 4
        # Round-robin: each round times every method once, so a burst of load elsewhere on the machine
        # hits all methods alike instead of one; a method sits out once it has used its budget.
        times: dict[str, list[float]] = {method: [] for method in BENCH_METHODS}
        outputs: dict[str, Tensor] = {}
        for round_index in range(repeats):
            for method in BENCH_METHODS:
                if times[method] and sum(times[method]) >= budget_s * 1e3:
                    continue
                if progress is not None:
                    progress(f"{size} {method} (round {round_index + 1}/{repeats})")
                elapsed, outputs[method] = time_once(calls[method], device)
                times[method].append(elapsed)
        medians = {method: statistics.median(times[method]) for method in BENCH_METHODS}
        size_rows = [
            Row(
                method=method,
                size=size,
                median_ms=medians[method],
                runs=len(times[method]),
                ratio_vs_svd=medians[method] / medians["svd"],
                max_rms_norm=exact_rms_norm(outputs[method]) if method in METHODS else None,
                guarantee=METHODS[method].enforces if method in METHODS else None,
                times_ms=times[method],
            )
            for method in BENCH_METHODS
        ]
        rows.extend(size_rows)
    return rows, input_norms


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def print_table(rows: list[Row], input_norms: dict[str, float], meta: dict, console: Console) -> None:
    table = Table(
        title=f"Constraint methods vs exact SVD clip (sigma_max = {SIGMA_MAX:g}, RMS->RMS)",
        caption=(
            f"{meta['device']}, {meta['dtype']}, torch {meta['torch']}, {meta['threads']} threads; "
            "msign = Muon's Newton-Schulz alone, for context; "
            f"softcap norm_bound = {meta['norm_bound']:.4f}; inputs' norms: "
            + ", ".join(f"{size} {norm:.4f}" for size, norm in input_norms.items())
        ),
    )
    table.add_column("size")
    table.add_column("method")
    table.add_column("median ms", justify="right")
    table.add_column("runs", justify="right")
    table.add_column("time / svd", justify="right")
    table.add_column("max norm after", justify="right")
    table.add_column("guarantee")
    previous = None
    for row in rows:
        if previous is not None and row.size != previous:
            table.add_section()
        previous = row.size
        over = row.max_rms_norm is not None and row.max_rms_norm > SIGMA_MAX * (1 + 1e-4)
        norm = fmt(row.max_rms_norm, ".4f")
        table.add_row(
            row.size,
            row.method,
            fmt(row.median_ms, ".1f"),
            str(row.runs),
            fmt(row.ratio_vs_svd, ".3f"),
            f"[red]{norm}[/red]" if over else norm,
            {True: "yes", False: "no", None: "-"}[row.guarantee],
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("256x256,512x512,1024x1024,2048x2048,768x3072"),
        help="comma-separated FAN_OUTxFAN_IN (default: 256x256,512x512,1024x1024,2048x2048,768x3072)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method and size (default: 5)")
    parser.add_argument(
        "--budget",
        type=float,
        default=8.0,
        help="seconds per method and size after which repeats stop early, >= 1 call (default: 8)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "budget_s": args.budget,
        "sigma_max": SIGMA_MAX,
        "lr": LR,
        "norm_bound": norm_bound(),
    }
    console = Console(stderr=args.json)
    start = time.perf_counter()
    if args.json:
        rows, input_norms = run(args.sizes, args.repeats, args.budget, device, dtype)
    else:
        with console.status("warming up") as status:
            rows, input_norms = run(
                args.sizes,
                args.repeats,
                args.budget,
                device,
                dtype,
                lambda text: status.update(f"timing {text}"),
            )
    meta["total_s"] = time.perf_counter() - start
    # Other processes on a small machine distort CPU timings: record how busy it was.
    meta["load_avg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.json:
        json.dump({**meta, "input_norms": input_norms, "results": [asdict(row) for row in rows]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(rows, input_norms, meta, console)
        load = meta["load_avg_1m"]
        console.print(f"total {meta['total_s']:.0f} s" + (f", load average {load:.2f} at the end" if load else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
