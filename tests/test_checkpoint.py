"""Tests for lipcli.checkpoint: round trips, atomic writes, and one-line errors for every bad file."""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from lipcli.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load,
    load_optimizer,
    optimizer_path,
    read_metadata,
    save,
    save_optimizer,
)
from lipcli.cli import app
from lipcli.errors import UserError
from lipcli.models import build_model, config_dict
from lipcli.spectral import rms_norm_exact

GPT = {"vocab_size": 11, "d_model": 16, "n_layers": 1, "n_heads": 2, "context": 8}
MLP = {"input_dim": 8, "hidden": 16, "n_layers": 3, "num_classes": 4}
CONFIGS = {"lipschitz-gpt": GPT, "baseline-gpt": GPT, "lipschitz-mlp": MLP}
TRAIN = {"method": "muon", "sigma_max": 1.0, "optimizer": "muon", "lr": 0.05}
METRICS = {"val_loss": 1.25, "val_acc": 0.5}
TOKENIZER = {"name": "char", "vocab": list("abcdefghijk")}
Reader = Callable[[Path], object]


def make_model(arch: str, **overrides: int) -> nn.Module:
    """A small model with random weights everywhere (the zero-initialized layers would hide bugs)."""
    model = build_model(arch, {**CONFIGS[arch], **overrides})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def model_input(arch: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    if arch == "lipschitz-mlp":
        return torch.randn(3, MLP["input_dim"], generator=generator)
    return torch.randint(0, GPT["vocab_size"], (2, GPT["context"]), generator=generator)


def rewrite(
    path: Path, drop: tuple[str, ...] = (), add: dict[str, torch.Tensor] | None = None, **meta: str | None
) -> None:
    """Rewrite a checkpoint with tensors dropped/added and metadata keys changed (None deletes a key)."""
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys() if name not in drop}
    tensors.update(add or {})
    for key, value in meta.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def expect_error(fn: Reader, path: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message
    return message


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save(tmp_path / "ckpt.safetensors", make_model("lipschitz-gpt"), train_config=TRAIN, step=3)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_round_trip(tmp_path: Path, arch: str) -> None:
    model = make_model(arch).eval()
    tokenizer = None if arch == "lipschitz-mlp" else TOKENIZER
    path = tmp_path / "runs" / "deep" / "model.safetensors"  # parents are created
    assert save(path, model, train_config=TRAIN, metrics=METRICS, step=42, tokenizer=tokenizer) == path

    ckpt = load(path)
    assert (ckpt.arch, ckpt.step, ckpt.path) == (arch, 42, path)
    assert ckpt.model_config == config_dict(model)
    assert (ckpt.train_config, ckpt.metrics, ckpt.tokenizer) == (TRAIN, METRICS, tokenizer)
    assert type(ckpt.model) is type(model) and not ckpt.model.training
    loaded = ckpt.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    x = model_input(arch)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), model(x))

    # Per-head weights [heads, d_head, d] record their largest head's norm.
    matrices = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    assert ckpt.spectral_norms.keys() == matrices.keys()
    for name, param in matrices.items():
        assert ckpt.spectral_norms[name] == float(rms_norm_exact(param).max())

    meta = read_metadata(path)
    assert meta == ckpt.metadata
    assert (meta["format"], meta["format_version"], meta["arch"]) == ("lipcli", str(FORMAT_VERSION), arch)
    assert (meta["method"], meta["sigma_max"], meta["optimizer"]) == ("muon", "1.0", "muon")
    assert meta["lipcli_version"]


def test_bf16_round_trip_keeps_dtype(tmp_path: Path) -> None:
    model = make_model("lipschitz-gpt").to(torch.bfloat16).eval()
    path = save(tmp_path / "bf16.safetensors", model)
    ckpt = load(path, device=torch.device("cpu"))
    assert {(p.dtype, p.device.type) for p in ckpt.model.parameters()} == {(torch.bfloat16, "cpu")}
    x = model_input("lipschitz-gpt")
    with torch.no_grad():
        out = ckpt.model(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, model(x))


def test_mixed_dtypes_load_as_float32(tmp_path: Path) -> None:
    model = make_model("baseline-gpt")
    model.head.to(torch.bfloat16)
    ckpt = load(save(tmp_path / "mixed.safetensors", model))
    assert {p.dtype for p in ckpt.model.parameters()} == {torch.float32}
    assert torch.equal(ckpt.model.head.weight, model.head.weight.float())


def test_tied_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    model = make_model("lipschitz-gpt")
    model.head.weight = model.embed.weight  # same shape [vocab, d]: a tied head
    fc_in = model.blocks[0].mlp.inner.fc_in
    fc_in.weight = nn.Parameter(fc_in.weight.detach().t().contiguous().t())
    assert not fc_in.weight.is_contiguous()
    ckpt = load(save(tmp_path / "tied.safetensors", model))
    assert torch.equal(ckpt.model.head.weight, model.embed.weight)
    assert torch.equal(ckpt.model.blocks[0].mlp.inner.fc_in.weight, fc_in.weight)


class Compiled(nn.Module):
    """What torch.compile returns, minus the compiler: the model under ``_orig_mod``, names prefixed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model


def test_compiled_model_saves_under_plain_names(tmp_path: Path) -> None:
    model = make_model("lipschitz-mlp")
    assert next(iter(Compiled(model).state_dict())).startswith("_orig_mod.")
    ckpt = load(save(tmp_path / "compiled.safetensors", Compiled(model)))
    assert torch.equal(ckpt.model.layers[0].weight, model.layers[0].weight)


def test_non_finite_metrics_are_stored_as_null(tmp_path: Path) -> None:
    metrics = {"val_loss": math.nan, "val_acc": 0.5, "curve": [math.inf, 1.0], "nested": {"x": -math.inf}}
    path = save(tmp_path / "nan.safetensors", make_model("lipschitz-mlp"), metrics=metrics)

    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    stored = json.loads(read_metadata(path)["metrics"], parse_constant=reject)
    expected = {"val_loss": None, "val_acc": 0.5, "curve": [None, 1.0], "nested": {"x": None}}
    assert stored == expected
    assert load(path).metrics == expected


def test_extra_metadata_is_json_and_cannot_shadow_fields(tmp_path: Path) -> None:
    model = make_model("lipschitz-mlp")
    path = save(tmp_path / "x.safetensors", model, extra={"note": "hi", "data": {"a": [1, 2]}})
    meta = read_metadata(path)
    assert (json.loads(meta["note"]), json.loads(meta["data"])) == ("hi", {"a": [1, 2]})
    with pytest.raises(ValueError, match="arch"):
        save(tmp_path / "y.safetensors", model, extra={"arch": "x"})


def test_failed_save_keeps_previous_file(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = saved.read_bytes()

    def half_write(tensors: dict, filename: str | os.PathLike[str], metadata: dict) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    # A full disk is the user's to fix: one line naming the file, not a traceback.
    with pytest.raises(UserError, match=f"cannot write {saved}: No space left on device"):
        save(saved, make_model("lipschitz-mlp"))
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]  # no temp file left behind


def test_saved_file_gets_umask_permissions(saved: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("fn", [load, read_metadata])
def test_missing_file(tmp_path: Path, fn: Reader) -> None:
    expect_error(fn, tmp_path / "nope.safetensors", "no such checkpoint file")


@pytest.mark.parametrize("fn", [load, read_metadata])
@pytest.mark.parametrize("keep", [4, 40, 0.5, -1])
def test_truncated_file(saved: Path, fn: Reader, keep: float) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    expect_error(fn, saved, "not a readable safetensors file")


@pytest.mark.parametrize("fn", [load, read_metadata])
def test_not_safetensors(tmp_path: Path, fn: Reader) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not the weights you are looking for")
    expect_error(fn, path, "not a readable safetensors file")


@pytest.mark.parametrize("fn", [load, read_metadata])
def test_foreign_safetensors_file(tmp_path: Path, fn: Reader) -> None:
    path = tmp_path / "hf.safetensors"
    safetensors.torch.save_file(make_model("lipschitz-mlp").state_dict(), path)
    expect_error(fn, path, "not a lipcli checkpoint (no lipcli metadata)", "lipcli convert")


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"format": "other"}, ["not a lipcli checkpoint"]),
        ({"format_version": str(FORMAT_VERSION + 1)}, ["newer lipcli", "upgrade"]),
        ({"format_version": "one"}, ["invalid format_version"]),
        ({"format_version": "0"}, ["invalid format_version"]),
        ({"format_version": None}, ["invalid format_version"]),
    ],
)
@pytest.mark.parametrize("fn", [load, read_metadata])
def test_bad_format_fields(saved: Path, fn: Reader, meta: dict[str, str | None], words: list[str]) -> None:
    rewrite(saved, **meta)
    expect_error(fn, saved, *words)


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"arch": "resnet"}, ["unknown architecture 'resnet'", "lipschitz-gpt"]),
        ({"arch": None}, ["'arch' is missing"]),
        ({"model_config": None}, ["'model_config' is missing"]),
        ({"model_config": "{oops"}, ["'model_config' is not valid JSON"]),
        ({"model_config": "[1, 2]"}, ["'model_config' is not a JSON object"]),
        ({"model_config": json.dumps({**GPT, "depth": 3})}, ["unknown lipschitz-gpt config field(s): depth"]),
        ({"model_config": json.dumps({**GPT, "n_heads": 3})}, ["bad model_config", "model.n_heads (3) must divide"]),
        ({"metrics": "nan"}, ["'metrics' is not valid JSON"]),
        ({"step": "three"}, ["invalid step"]),
        ({"model_config": json.dumps({**GPT, "n_heads": 0})}, ["model.n_heads must be an integer >= 1 (got 0)"]),
        ({"model_config": json.dumps({**GPT, "n_layers": -1})}, ["model.n_layers must be an integer >= 1 (got -1)"]),
        ({"model_config": json.dumps({**GPT, "d_model": 16.0})}, ["model.d_model must be an integer (got 16.0)"]),
        ({"model_config": json.dumps({**GPT, "final_scale": "2"})}, ["model.final_scale must be a finite number"]),
        ({"model_config": json.dumps({**GPT, "final_scale": None})}, ["model.final_scale must be a finite number"]),
        ({"model_config": json.dumps({**GPT, "mlp_gain": 0})}, ["model.mlp_gain must have magnitude"]),
        ({"model_config": json.dumps({**GPT, "softmax_scale": 1e7})}, ["model.softmax_scale must"]),
        ({"model_config": json.dumps({**GPT, "content_heads": 9})}, ["model.content_heads must"]),
        ({"model_config": json.dumps({**GPT, "zero_init": 1})}, ["model.zero_init must be true or false"]),
        ({"train_config": json.dumps({"seed": "zero"})}, ["train_config field 'seed' has the wrong type"]),
        ({"train_config": json.dumps({"data": 3})}, ["train_config field 'data' has the wrong type"]),
        ({"train_config": json.dumps({"val_fraction": 2})}, ["'val_fraction' must lie in (0, 1)"]),
    ],
)
def test_bad_metadata(saved: Path, meta: dict[str, str | None], words: list[str]) -> None:
    rewrite(saved, **meta)
    expect_error(load, saved, *words)


def test_shape_mismatch_names_first_tensor(tmp_path: Path) -> None:
    path = save(tmp_path / "wide.safetensors", make_model("lipschitz-gpt", d_model=32))
    rewrite(path, model_config=json.dumps(config_dict(make_model("lipschitz-gpt"))))
    # All 8 tensors differ; "blocks.0.attn.inner.k.weight" sorts first.
    expect_error(
        load,
        path,
        'shape mismatch "blocks.0.attn.inner.k.weight: file [2, 16, 32] vs config [2, 8, 16]"',
        "(and 7 more)",
    )


def test_missing_and_unexpected_tensors(saved: Path) -> None:
    rewrite(saved, drop=("head.weight", "embed.weight"))
    expect_error(load, saved, 'missing tensor "embed.weight" (and 1 more)')
    rewrite(saved, add={"aaa.extra": torch.zeros(2)})
    expect_error(load, saved, 'unexpected tensor "aaa.extra" (and 2 more)')


def test_declared_layers_are_checked_against_the_file_before_building(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file declaring a million layers must fail on its header, never by building them."""
    rewrite(saved, model_config=json.dumps({**GPT, "n_layers": 10**6}))
    monkeypatch.setattr("lipcli.checkpoint.build_model", lambda *a, **k: pytest.fail("built a model"))
    expect_error(load, saved, "declares model.n_layers = 1000000 but the file stores 1")


def test_huge_declared_width_is_a_shape_mismatch(saved: Path) -> None:
    # 10**5 wide would need ~10**12 values if the model were allocated before the shapes are compared.
    rewrite(saved, model_config=json.dumps({**GPT, "d_model": 10**5, "n_heads": 2}))
    expect_error(load, saved, "tensors do not match model_config")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights(saved: Path, bad: float) -> None:
    with safe_open(saved, framework="pt") as f:
        weight = f.get_tensor("head.weight")
    weight[0, 0] = bad
    rewrite(saved, add={"head.weight": weight})
    expect_error(load, saved, 'tensor "head.weight" holds NaN or infinite values')


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn, torch.uint8])
def test_non_float_or_fp8_tensor_is_refused(saved: Path, dtype: torch.dtype) -> None:
    rewrite(saved, add={"head.weight": torch.zeros(11, 16).to(dtype)})
    expect_error(load, saved, 'tensor "head.weight" is stored as')


@pytest.mark.parametrize("fn", [load, read_metadata])
def test_directory_is_named_as_one(tmp_path: Path, fn: Reader) -> None:
    folder = tmp_path / "run.safetensors"
    folder.mkdir()
    expect_error(fn, folder, "is a directory")


@pytest.mark.parametrize("fn", [load, read_metadata])
def test_random_bytes(tmp_path: Path, fn: Reader) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(70_000))
    expect_error(fn, path, "not a readable safetensors file")


def test_fp8_file_is_pointed_back_to_convert(saved: Path) -> None:
    rewrite(saved, format="lipcli-fp8")
    expect_error(load, saved, "fp8 file", "lipcli convert")


def test_no_message_names_a_command_lipcli_lacks() -> None:
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    source = Path(load.__code__.co_filename).read_text()
    mentioned = set(re.findall(r"`lipcli (\w+)", source))
    assert mentioned and mentioned <= commands, mentioned - commands


class Smuggled:
    """Any non-weight object: weights_only loading must refuse to unpickle it."""


def test_optimizer_round_trip(tmp_path: Path) -> None:
    # An AdamW-style state_dict built by hand: constructing a torch.optim optimizer costs seconds of imports.
    group = {"lr": 0.01, "betas": (0.9, 0.95), "foreach": None, "amsgrad": False, "params": [0, 1]}
    entries = {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, i + 1), "buf": None} for i in (0, 1)}
    state = {"state": entries, "param_groups": [group]}
    generator = torch.Generator().manual_seed(5)
    extra = {"step": 9, "rng": generator.get_state(), "note": "x", "history": [1.5, 2.5]}
    ckpt = tmp_path / "run" / "model.safetensors"

    path = save_optimizer(ckpt, state, extra)
    assert path == optimizer_path(ckpt) == tmp_path / "run" / "model.safetensors.optim.pt"
    restored = load_optimizer(ckpt)
    assert restored.keys() == {"optimizer", "extra"}
    assert restored["optimizer"]["param_groups"] == state["param_groups"]
    for i, entry in state["state"].items():
        loaded = restored["optimizer"]["state"][i]
        assert loaded.keys() == entry.keys() and loaded["buf"] is None
        assert torch.equal(loaded["exp_avg"], entry["exp_avg"]) and torch.equal(loaded["step"], entry["step"])
    assert {k: v for k, v in restored["extra"].items() if k != "rng"} == {
        "step": 9,
        "note": "x",
        "history": [1.5, 2.5],
    }
    expected = torch.randn(4, generator=generator)
    replay = torch.Generator().set_state(restored["extra"]["rng"])
    assert torch.equal(torch.randn(4, generator=replay), expected)


def test_optimizer_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "model.safetensors"
    expect_error(load_optimizer, ckpt, "no optimizer state", "--resume")
    torch.save({"format_version": 1, "optimizer": {}, "extra": {"x": Smuggled()}}, optimizer_path(ckpt))
    expect_error(load_optimizer, ckpt, "unreadable optimizer state")
    optimizer_path(ckpt).write_bytes(b"garbage")
    expect_error(load_optimizer, ckpt, "unreadable optimizer state")
    torch.save({"optimizer": {}}, optimizer_path(ckpt))
    expect_error(load_optimizer, ckpt, "not a lipcli optimizer-state file")
    torch.save({"format_version": 99, "optimizer": {}, "extra": {}}, optimizer_path(ckpt))
    expect_error(load_optimizer, ckpt, "unsupported format_version 99")

    before = optimizer_path(ckpt).read_bytes()

    def half_save(obj: object, f: str | os.PathLike[str]) -> None:
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C mid-save must clean up too

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        save_optimizer(ckpt, {}, {})
    assert optimizer_path(ckpt).read_bytes() == before
    assert os.listdir(tmp_path) == [optimizer_path(ckpt).name]
