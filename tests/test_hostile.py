"""Hostile and careless input for every command but train: one line on stderr, exit 2, no traceback, nothing changed.

Each table is a class of bad input. Where the class can be enumerated it is, so it stays closed as the code
grows: every model config field (from the dataclasses), every command that loads a checkpoint, every
spelling of "the same file".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import typer.main
from safetensors import safe_open
from typer.testing import CliRunner

from lipcli import checkpoint
from lipcli.cli import app
from lipcli.convert import convert
from lipcli.data import CharTokenizer, resolve_text
from lipcli.models import GPTConfig, LipschitzGPT, MLPConfig, build_model

runner = CliRunner()
COMMAND = typer.main.get_command(app)
GPT = {"vocab_size": 65, "d_model": 16, "n_layers": 1, "n_heads": 2, "context": 16, "zero_init": False}
MLP = {"input_dim": 64, "hidden": 16, "n_layers": 2, "num_classes": 10}
TRAIN_CONFIG = {"data": "tinyshakespeare", "tokenizer": "char", "val_fraction": 0.1, "method": "softcap"}
# Tiny sweep settings with GPTConfig's defaults where the preset differs, so OUT_OF_RANGE means the same
# on both paths; a bad input must fail before any of this trains.
SWEEP = ["sweep", "--optimizer", "muon", "--method", "softcap", "--sigma-max", "1", "--no-baseline", "--steps", "1",
         "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "model.residual_scale=1", "--set", "model.context=16", "--set", "train.device=cpu",
         "--set", "model.softmax_scale=1", "--set", "model.activation=gelu"]  # fmt: skip
MLP_SWEEP = ["sweep", "--preset", "mlp-digits", "--optimizer", "muon", "--method", "softcap", "--sigma-max", "1",
             "--no-baseline", "--steps", "1", "--set", "train.device=cpu"]  # fmt: skip


@pytest.fixture(autouse=True)
def _build_cli_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """typer rebuilds the click command from the annotations on every invoke (~0.15 s); this module invokes it
    hundreds of times, so it reuses one build."""
    monkeypatch.setattr("typer.testing._get_command", lambda _: COMMAND)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good.safetensors (a tiny LipschitzGPT) and mlp.safetensors, built once and copied for each test."""
    path = tmp_path_factory.mktemp("template")
    tokenizer = CharTokenizer.from_text(resolve_text()[0]).to_dict()
    checkpoint.save(path / "good.safetensors", build_model("lipschitz-gpt", GPT), train_config=TRAIN_CONFIG,
                    tokenizer=tokenizer)  # fmt: skip
    checkpoint.save(path / "mlp.safetensors", build_model("lipschitz-mlp", MLP), train_config={"data": "digits"})
    return path


@pytest.fixture
def folder(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "work"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden temp files too): a file's sha256, a link's target, or "dir"."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = "link -> " + os.readlink(path)
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "dir"
    return state


def assert_refused(args: list[Any], folder: Path, *words: str) -> str:
    """The command exits 2 with one line on stderr naming ``words``, no traceback, and ``folder`` unchanged."""
    before = snapshot(folder)
    result = runner.invoke(app, [str(arg) for arg in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (args, word, lines[0])
    assert snapshot(folder) == before, args
    return lines[0]


def rewrite(src: Path, dst: Path, drop: tuple[str, ...] = (), add: dict | None = None, **meta: str | None) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` with tensors dropped/added and metadata changed (None deletes)."""
    with safe_open(src, framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys() if name not in drop}
    tensors.update(add or {})
    for key, value in meta.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    safetensors.torch.save_file(tensors, dst, metadata=metadata)
    return dst


def _tensor(good: Path, name: str) -> torch.Tensor:
    with safe_open(good, framework="pt") as f:
        return f.get_tensor(name)


def _poisoned(value: float) -> Callable[[Path, Path], Path]:
    def make(good: Path, dst: Path) -> Path:
        weight = _tensor(good, "head.weight")
        weight[3, 5] = value
        return rewrite(good, dst, add={"head.weight": weight})

    return make


def _write(data: bytes) -> Callable[[Path, Path], Path]:
    def make(good: Path, dst: Path) -> Path:
        dst.write_bytes(data)
        return dst

    return make


def _config(**changes: Any) -> Callable[[Path, Path], Path]:
    return lambda good, dst: rewrite(good, dst, model_config=json.dumps({**GPT, **changes}))


def _directory(good: Path, dst: Path) -> Path:
    dst.mkdir()
    return dst


def _foreign(good: Path, dst: Path) -> Path:
    safetensors.torch.save_file(build_model("lipschitz-gpt", GPT).state_dict(), dst)
    return dst


# name -> (make the file from good.safetensors, words of the one line; per command where they differ).
# A None for a command means the file is legal input there (convert reads fp8 files).
BAD_FILES: dict[str, tuple[Callable[[Path, Path], Path], str | dict[str, str | None]]] = {
    "missing": (lambda good, dst: dst, "no such"),
    "fifo": (lambda good, dst: os.mkfifo(dst) or dst, "not a regular file"),
    "directory": (_directory, "is a directory"),
    "empty": (_write(b""), "not a readable safetensors file"),
    "random bytes": (_write(random.Random(0).randbytes(70_000)), "not a readable safetensors file"),
    "text": (_write(b"these are not the weights you are looking for"), "not a readable safetensors file"),
    "truncated": (lambda good, dst: _write(good.read_bytes()[:-100])(good, dst), "not a readable safetensors file"),
    "header only": (lambda good, dst: _write(good.read_bytes()[:100])(good, dst), "not a readable safetensors file"),
    "foreign safetensors": (_foreign, {"*": "not a lipcli checkpoint", "convert": "without a model config"}),
    "fp8 file": (lambda good, dst: rewrite(good, dst, format="lipcli-fp8"), {"*": "fp8 file", "convert": None}),
    "newer format": (lambda good, dst: rewrite(good, dst, format_version="99"), "newer lipcli"),
    "unknown arch": (lambda good, dst: rewrite(good, dst, arch="resnet"), "unknown architecture"),
    "config not JSON": (lambda good, dst: rewrite(good, dst, model_config="{oops"), "not valid JSON"),
    "config a list": (lambda good, dst: rewrite(good, dst, model_config="[1, 2]"), "not a JSON object"),
    "unknown field": (_config(depth=3), "unknown lipschitz-gpt config field(s): depth"),
    "a million layers": (_config(n_layers=10**6), "declares model.n_layers = 1000000 but the file stores 1"),
    "a huge width": (_config(d_model=10**6), "tensors do not match model_config"),
    "NaN weight": (_poisoned(math.nan), 'tensor "head.weight" holds NaN or infinite values'),
    "Inf weight": (_poisoned(math.inf), 'tensor "head.weight" holds NaN or infinite values'),
    "-Inf weight": (_poisoned(-math.inf), 'tensor "head.weight" holds NaN or infinite values'),
    "int tensor": (
        lambda good, dst: rewrite(good, dst, add={"head.weight": torch.ones(65, 16, dtype=torch.int32)}),
        'tensor "head.weight" is stored as I32',
    ),
    "missing tensor": (lambda good, dst: rewrite(good, dst, drop=("head.weight",)), 'missing tensor "head.weight"'),
    "extra tensor": (
        lambda good, dst: rewrite(good, dst, add={"aaa.extra": torch.zeros(2)}),
        'unexpected tensor "aaa.extra"',
    ),
    "wrong shape": (
        lambda good, dst: rewrite(good, dst, add={"head.weight": torch.zeros(65, 8)}),
        'shape mismatch "head.weight',
    ),
    "bad step": (lambda good, dst: rewrite(good, dst, step="three"), "invalid step"),
    "train_config seed": (
        lambda good, dst: rewrite(good, dst, train_config=json.dumps({"seed": "x"})),
        "train_config field 'seed'",
    ),
    "train_config data": (
        lambda good, dst: rewrite(good, dst, train_config=json.dumps({"data": ["a"]})),
        "train_config field 'data'",
    ),
}

# Every command that reads a checkpoint, with the arguments that make it reach the file.
LOADERS: dict[str, Callable[[Path, Path], list[Any]]] = {
    "certify": lambda path, out: ["certify", path],
    "activations": lambda path, out: ["activations", path, "--device", "cpu", "--batches", "1"],
    "attack": lambda path, out: ["attack", path, "--eps", "0.1", "--device", "cpu", "--n", "1", "--steps", "1"],
    "convert": lambda path, out: ["convert", path, out / "converted.safetensors"],
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_every_loader_refuses_every_bad_file(folder: Path, case: str) -> None:
    make, words = BAD_FILES[case]
    path = make(folder / "good.safetensors", folder / "bad.safetensors")
    for command, args in LOADERS.items():
        expected = words if isinstance(words, str) else words.get(command, words["*"])
        if expected is not None:
            assert_refused(args(path, folder), folder, str(path), expected)


# One value of the wrong type per field type: the table follows the dataclasses, so a new field is covered.
WRONG_TYPES: dict[str, list[Any]] = {
    "int": ["2", 2.5, True, None],
    "float": ["1", None, True, math.nan, math.inf],
    "bool": [1, "true", None],
    "str": [3, None],
}
# Out-of-range values per field (a field missing here fails test_every_numeric_field_has_a_range_case).
OUT_OF_RANGE: dict[str, list[Any]] = {
    "vocab_size": [0, -1],
    "d_model": [0, -16],
    "n_layers": [0, -1],
    "n_heads": [0, -2, 3],  # 3 does not divide d_model 16
    "context": [0, -1],
    "mlp_ratio": [0, -4],
    "residual_scale": [0.0, -1.0, 2.0],  # a = residual_scale / (2 n_layers) must lie in (0, 1)
    "softmax_scale": [1e7, -1e7],
    "content_heads": [-1, 3],  # n_heads is 2
    "content_layers": [-1, 3],  # n_layers is 2
    "final_scale": [1e7, -1e7],
    "attn_out_scale": [1e7, -1e7],
    "mlp_gain": [0.0, 1e-9, 1e7],  # GeLU(g z) / g is 0/0 at g = 0
    "group_size": [1, 0],
    "seed": [2**64, -(2**63) - 1],
    "activation": ["relu", ""],
    "content_bias": ["rope", ""],
    "content_bias_limit": [0.0, -1.0, 1e7],
    "input_dim": [0],
    "hidden": [0],
    "num_classes": [0],
}
MLP_OUT_OF_RANGE = {"n_layers": [1]}  # the MLP needs an input layer and a head


def _config_cases() -> dict[tuple[str, str], list[Any]]:
    """(arch, field) -> the bad values to try: one per wrong type, then the out-of-range ones."""
    cases = {}
    for arch, config_cls in (("lipschitz-gpt", GPTConfig), ("lipschitz-mlp", MLPConfig)):
        for f in fields(config_cls):
            optional = f.type.endswith(" | None")  # None is legal there
            wrong = [v for v in WRONG_TYPES[f.type.removesuffix(" | None")] if not (optional and v is None)]
            cases[arch, f.name] = wrong + OUT_OF_RANGE.get(f.name, [])
    for name, values in MLP_OUT_OF_RANGE.items():
        cases["lipschitz-mlp", name] += values
    return cases


CONFIG_CASES = _config_cases()


def test_every_numeric_field_has_a_range_case() -> None:
    for config_cls in (GPTConfig, MLPConfig):
        for f in fields(config_cls):
            if f.type.removesuffix(" | None") in ("int", "float") or f.name == "activation":
                assert f.name in OUT_OF_RANGE, f"no out-of-range case for model.{f.name}"


def test_groupsort_needs_groups_that_divide_the_width(folder: Path) -> None:
    path = _config(activation="groupsort", group_size=3)(folder / "good.safetensors", folder / "bad.safetensors")
    assert_refused(["certify", path], folder, "model.group_size (3) must divide the MLP width 64")


def test_odd_head_width_is_refused(folder: Path) -> None:
    path = _config(d_model=6, n_heads=2)(folder / "good.safetensors", folder / "bad.safetensors")
    assert_refused(["certify", path], folder, "model.d_model / model.n_heads = 3 must be even")


@pytest.mark.parametrize(("arch", "name"), sorted(CONFIG_CASES))
def test_every_config_field_is_checked_at_load(folder: Path, arch: str, name: str) -> None:
    good = folder / ("good.safetensors" if arch == "lipschitz-gpt" else "mlp.safetensors")
    base = GPT if arch == "lipschitz-gpt" else MLP
    for value in CONFIG_CASES[arch, name]:
        # allow_nan: NaN and Infinity are what a hostile file would carry, though lipcli never writes them.
        config = json.dumps({**base, name: value}, allow_nan=True)
        path = rewrite(good, folder / "bad.safetensors", model_config=config)
        assert_refused(["certify", path], folder, str(path), f"model.{name}")


@pytest.mark.parametrize(("arch", "name"), sorted(CONFIG_CASES))
def test_every_config_field_is_checked_before_training(folder: Path, arch: str, name: str) -> None:
    sweep = SWEEP if arch == "lipschitz-gpt" else MLP_SWEEP
    out = folder / "sweep"
    for value in CONFIG_CASES[arch, name]:
        assert_refused([*sweep, "--set", f"model.{name}={json.dumps(value)}", "--out", out], folder, f"model.{name}")
        assert not out.exists()


def _forward_is_finite(**changes: Any) -> bool:
    """Build LipschitzGPT directly, past validation, and run it on a fixed batch."""
    model = LipschitzGPT(GPTConfig(**{**GPT, **changes}))
    tokens = torch.randint(0, GPT["vocab_size"], (2, GPT["context"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return bool(torch.isfinite(model(tokens)).all())


@pytest.mark.parametrize(
    "changes",
    [{"mlp_gain": 0.0}, {"mlp_gain": 1e-300}, {"mlp_gain": 1e300}, {"final_scale": 1e300}, {"attn_out_scale": 1e300}],
)  # fmt: skip
def test_rejected_scales_really_give_a_non_finite_forward(changes: dict[str, float]) -> None:
    """Why each forward-finiteness rule exists: the model these values build outputs NaN or Inf."""
    assert not _forward_is_finite(**changes)
    with pytest.raises(ValueError, match=f"model.{next(iter(changes))}"):
        build_model("lipschitz-gpt", {**GPT, **changes})


@pytest.mark.parametrize(
    "changes",
    # softmax_scale 0 makes every head a position head; other scales are folded into q (SDPA's own scale <= 0 is NaN).
    [{"softmax_scale": 0.0}, {"softmax_scale": -1.0}, {"softmax_scale": 1e-300}, {"content_heads": 0},
     {"softmax_scale": 1e-6}, {"softmax_scale": 1e6}, {"softmax_scale": 0.0, "position_bias": True},
     {"softmax_scale": -1.0, "position_bias": True}, {"mlp_gain": 1e-6}, {"mlp_gain": -1e6}, {"final_scale": 0.0},
     {"final_scale": -1e6}, {"attn_out_scale": 0.0}, {"attn_out_scale": -1e6}, {"residual_scale": 1e-300},
     {"activation": "groupsort", "mlp_gain": 0.0}, {"position_bias": True, "content_bias_limit": 1e-6}],
)  # fmt: skip
def test_accepted_edge_values_give_a_finite_forward(changes: dict[str, Any]) -> None:
    build_model("lipschitz-gpt", {**GPT, **changes})
    assert _forward_is_finite(**changes)


# --- flags: each command's options, the values it cannot use -------------------------------------------------
FLAGS: list[tuple[list[str], str]] = [
    (["activations", "{good}", "--batches", "0"], "--batches"),
    (["activations", "{good}", "--batch-size", "-1"], "--batch-size"),
    (["activations", "{good}", "--batches", "abc"], "--batches"),
    (["activations", "{good}", "--device", "quantum"], "--device 'quantum'"),
    (["activations", "{good}", "--data", "{folder}"], "directory"),
    (["activations", "{good}", "--data", "{folder}/nope.txt"], "not found"),
    (["activations"], "Missing argument"),
    (["activations", "{good}", "--bogus"], "No such option: --bogus"),
    (["attack", "{good}"], "Missing option '--eps'"),
    (["attack", "{good}", "--eps", "nan"], "--eps"),
    (["attack", "{good}", "--eps", "inf"], "--eps"),
    (["attack", "{good}", "--eps", "-1"], "--eps"),
    (["attack", "{good}", "--eps", "abc"], "--eps"),
    (["attack", "{good}", "--eps", ""], "--eps"),
    (["attack", "{good}", "--eps", "0.1", "--norm", "l3"], "unknown norm"),
    (["attack", "{good}", "--eps", "0.1", "--attack", "cw"], "unknown attack"),
    (["attack", "{good}", "--eps", "0.1", "--attack", "apgd"], "apgd"),
    (["attack", "{good}", "--eps", "0.1", "--steps", "0"], "--steps"),
    (["attack", "{good}", "--eps", "0.1", "--restarts", "0"], "--restarts"),
    (["attack", "{good}", "--eps", "0.1", "--alpha", "0"], "--alpha"),
    (["attack", "{good}", "--eps", "0.1", "--alpha", "nan"], "--alpha"),
    (["attack", "{good}", "--eps", "0.1", "--n", "0"], "--n"),
    (["attack", "{good}", "--eps", "0.1", "--device", "quantum"], "--device 'quantum'"),
    (["convert", "{good}", "{folder}/o.safetensors", "--dtype", "int4"], "unknown --dtype"),
    (["convert", "{good}", "{folder}/o.safetensors", "--to", "onnx"], "unknown --to"),
    (["convert", "{good}", "{folder}/o.onnx"], "cannot tell the format"),
    (["convert", "{good}", "{folder}/o.safetensors", "--project", "none", "--sigma-max", "1"], "does not bound"),
    (["convert", "{good}", "{folder}/o.safetensors", "--project", "bogus", "--sigma-max", "1"], "unknown constraint"),
    (["convert", "{good}", "{folder}/o.safetensors", "--project", "svd"], "--sigma-max"),
    (["convert", "{good}", "{folder}/o.safetensors", "--project", "svd", "--sigma-max", "nan"], "--sigma-max"),
    (["convert", "{good}", "{folder}/o.safetensors", "--project", "svd", "--sigma-max", "inf"], "--sigma-max"),
    (["convert", "{good}", "{folder}/o.safetensors", "--project", "svd", "--sigma-max", "-1"], "--sigma-max"),
    (["convert", "{good}", "{folder}/o.safetensors", "--sigma-max", "1"], "--sigma-max needs --project"),
    (["convert", "{good}", "{folder}/o.safetensors", "--eval-batches", "-1"], "--eval-batches"),
    (["convert", "{good}", "{folder}/o.safetensors", "--npz-checkpoint", "3"], "--npz-checkpoint"),
    (["convert", "{good}", "{folder}/o.safetensors", "--preset", "shakespeare-cpu"], "carries its own config"),
    (["convert", "{good}", "{folder}/o.safetensors", "--data", "{folder}/nope.txt"], "not found"),
    (["convert", "{good}"], "Missing argument"),
    (["presets", "--bogus"], "No such option"),
    (["presets", "extra"], "unexpected extra argument"),
    (["bogus-command"], "No such command"),
    ([*SWEEP, "--jobs", "0"], "--jobs"),
    ([*SWEEP, "--sigma-max", "nan"], "--sigma-max"),
    ([*SWEEP, "--sigma-max", "inf"], "--sigma-max"),
    ([*SWEEP, "--sigma-max", "abc"], "--sigma-max"),
    ([*SWEEP, "--sigma-max", ","], "--sigma-max needs at least one value"),
    ([*SWEEP, "--optimizer", "sgd"], "unknown optimizer"),
    ([*SWEEP, "--method", "bogus"], "unknown constraint method"),
    ([*SWEEP, "--lr", "muon=abc"], "--lr"),
    ([*SWEEP, "--lr", "muon=nan"], "--lr muon must be finite"),
    ([*SWEEP, "--lr", "muon=-1"], "--lr muon must be finite"),
    ([*SWEEP, "--lr", "sgd=0.1"], "'sgd' is not in --optimizer"),
    ([*SWEEP, "--method", "wd", "--decay", "nan"], "--decay"),
    ([*SWEEP, "--method", "wd", "--decay", "-1"], "--decay"),
    ([*SWEEP, "--steps", "0"], "train.steps"),
    ([*SWEEP, "--preset", "nope"], "unknown preset"),
    ([*SWEEP, "--baseline-preset", "shakespeare-baseline"], "choose one"),
    ([*SWEEP, "--set", "bogus=1"], "unknown setting"),
    ([*SWEEP, "--set", "noequals"], "KEY=VALUE"),
    ([*SWEEP, "--set", "train.method=svd"], "the sweep sets it"),
]


@pytest.mark.parametrize(("args", "words"), FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FLAGS])
def test_bad_flags(folder: Path, args: list[str], words: str) -> None:
    good = folder / "good.safetensors"
    filled = [arg.format(good=good, folder=folder) for arg in args]
    out = ["--out", folder / "sweep"] if args[0] == "sweep" else []
    assert_refused([*filled, *out], folder, words)


# --- paths: the same file by another name, directories, unwritable places, brackets ----------------------------
def _same_file_spellings(folder: Path) -> list[Path]:
    good = folder / "good.safetensors"
    (folder / "link.safetensors").symlink_to(good)
    os.link(good, folder / "hard.safetensors")
    (folder / "sub").mkdir()
    return [good, folder / "link.safetensors", folder / "hard.safetensors", folder / "sub" / ".." / "good.safetensors",
            Path(os.path.relpath(good))]  # fmt: skip


def test_convert_never_overwrites_its_input(folder: Path) -> None:
    for dst in _same_file_spellings(folder):
        assert_refused(["convert", folder / "good.safetensors", dst], folder, "never overwrites its input")
        assert_refused(["convert", dst, folder / "good.safetensors"], folder, "never overwrites its input")


def test_convert_directories_and_unwritable_destinations(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = folder / "good.safetensors"
    assert_refused(["convert", folder, folder / "o.safetensors"], folder, f"{folder}: is a directory")
    (folder / "out.safetensors").mkdir()
    assert_refused(["convert", good, folder / "out.safetensors"], folder, "is a directory")
    assert_refused(["convert", good, good / "o.safetensors"], folder, "is not a directory")

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    # Root writes anywhere, so a read-only folder is simulated where the write starts.
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    assert_refused(["convert", good, folder / "o.safetensors"], folder, "cannot write", "Permission denied")


def test_convert_that_fails_mid_write_leaves_the_old_destination(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good, old = folder / "good.safetensors", folder / "old.safetensors"
    old.write_bytes(b"previous")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    assert_refused(["convert", good, old], folder, "cannot write", "No space left on device")


@pytest.mark.parametrize("command", ["activations", "attack"])
def test_plot_paths_are_checked_before_the_work(folder: Path, command: str) -> None:
    args = LOADERS[command](folder / "good.safetensors", folder)
    assert_refused([*args, "--plot", folder], folder, "--plot", "is a directory")
    assert_refused([*args, "--plot", folder / "good.safetensors" / "x.png"], folder, "--plot", "not a directory")


def test_sweep_out_and_its_files(folder: Path) -> None:
    assert_refused([*SWEEP, "--out", folder / "good.safetensors"], folder, "is a file")
    out = folder / "[red]sweep"
    out.mkdir()
    (out / "sweep.json").write_bytes(random.Random(1).randbytes(100))
    assert_refused([*SWEEP, "--out", out], folder, f"{out}/sweep.json: unreadable sweep file")
    (out / "sweep.json").write_text("[1, 2]")
    assert_refused([*SWEEP, "--out", out], folder, "not a JSON object")


def test_sweep_corrupt_point_file(folder: Path) -> None:
    out = folder / "sweep"
    runner.invoke(app, [*SWEEP, "--out", str(out), "--json"])  # a real one-step point to corrupt
    (point,) = (out / "points").iterdir()
    point.write_text('{"name": "x"}')
    assert_refused([*SWEEP, "--out", out], folder, str(point), "not a sweep result row")


def _unwrapped(text: str) -> str:
    """Table titles wrap to the table's width; the test paths hold no whitespace, so drop it all."""
    return "".join(text.split())


def test_brackets_in_paths_print_literally(folder: Path) -> None:
    good = folder / "[bold]good.safetensors"
    (folder / "good.safetensors").rename(good)
    dst = folder / "[red]out[/red].safetensors"
    result = runner.invoke(app, ["convert", str(good), str(dst)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert str(good) in result.stdout and str(dst) in result.stdout
    plot = folder / "[bold]plot.png"
    args = ["--device", "cpu", "--batches", "1", "--batch-size", "2", "--plot", str(plot)]
    result = runner.invoke(app, ["activations", str(good), *args], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"plot: {plot}" in result.stdout and str(good) in _unwrapped(result.stdout)
    plot = folder / "new [dir]" / "[green]attack.png"  # a folder that does not exist yet, as for every output
    args = ["--eps", "0.1", "--device", "cpu", "--n", "2", "--steps", "1", "--plot", str(plot)]
    result = runner.invoke(app, ["attack", str(good), *args], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"plot: {plot}" in result.stdout and str(good) in _unwrapped(result.stdout) and plot.exists()
    assert_refused(["activations", folder / "[b]missing.safetensors"], folder, "[b]missing.safetensors")


def test_convert_refuses_a_hostile_fp8_scale(folder: Path) -> None:
    fp8 = folder / "fp8.safetensors"
    convert(folder / "good.safetensors", fp8, dtype="fp8-e4m3")
    with safe_open(fp8, framework="pt") as f:
        scales = json.loads(f.metadata()["fp8_scales"])
    hostile = rewrite(fp8, folder / "hostile.safetensors", fp8_scales=json.dumps({**scales, "head.weight": "x"}))
    assert_refused(["convert", hostile, folder / "back.safetensors"], folder, "fp8_scales['head.weight']")


def _reference_npz(path: Path, **args: Any) -> Path:
    """A reference .npz shaped like Arongil/lipschitz-transformers' (args and weights pickled as objects)."""
    args = {"d_embed": 8, "num_heads": 2, "num_blocks": 1, "vocab_size": 11, "seq_len": 6, **args}
    d, vocab = 8, 11
    shapes = [(d, vocab), (d, d), (d, d), (d, d), (d, d), (4 * d, d), (d, 4 * d), (vocab, d)]
    weights = {i: np.ones(shape, dtype=np.float32) * 0.1 for i, shape in enumerate(shapes)}
    np.savez(path, args=np.array(args, dtype=object), weights_checkpoint_0=np.array(weights, dtype=object))
    return path


@pytest.mark.parametrize(
    ("args", "words"),
    [({"d_embed": "abc"}, "reference args do not describe a model"), ({"num_heads": 0}, "describe no GPT"),
     ({"num_heads": 3}, "describe no GPT"), ({"seq_len": "long"}, "reference args do not describe a model"),
     ({"final_scale": "big"}, "reference args do not describe a model"),
     ({"softmax_scale": 1e7}, "model.softmax_scale"), ({"num_blocks": 10**6}, "a 1000000-block GPT")],
)  # fmt: skip
def test_hostile_reference_npz(folder: Path, args: dict[str, Any], words: str) -> None:
    npz = _reference_npz(folder / "ref.npz", **args)
    assert_refused(["convert", npz, folder / "out.safetensors", "--allow-pickle"], folder, words)


def test_well_formed_reference_npz_converts(folder: Path) -> None:
    """The table above fails for its hostile values, not for the file's shape."""
    npz = _reference_npz(folder / "ref.npz")
    result = runner.invoke(app, ["convert", str(npz), str(folder / "out.safetensors"), "--allow-pickle"])
    assert result.exit_code == 0, result.output
