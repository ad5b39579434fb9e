"""Checkpoints: one safetensors file holding the weights plus everything needed to rebuild and judge them.

The safetensors header metadata (str -> str) carries:

- ``format`` = ``"lipcli"``, ``format_version``, ``arch``, ``lipcli_version``, ``step``: plain strings;
- ``model_config``, ``train_config``, ``metrics``, ``tokenizer``, ``spectral_norms`` and every ``extra``
  key: strict JSON (non-finite floats are stored as ``null``);
- ``method``, ``sigma_max``, ``optimizer``: copied from ``train_config`` for quick inspection (strings
  as-is, anything else as JSON).

``spectral_norms`` are the exact RMS->RMS norms of every 2-D parameter at save time: a record, never a
certificate (certify recomputes them from the weights). Files are written atomically, so a crash or a
full disk never destroys the previous checkpoint. Optimizer state for ``--resume`` lives next to the
checkpoint in ``<checkpoint>.optim.pt`` and is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import UserError
from .files import atomic_write, one_line, strict_json
from .models import ARCHITECTURES, LAYER_LISTS, GPTConfig, MLPConfig, build_model, config_dict, config_from_dict
from .precision import FP8_FORMAT
from .spectral import rms_norm_exact

FORMAT_VERSION = 1
FORMAT = "lipcli"
OPTIMIZER_SUFFIX = ".optim.pt"
# Copied from train_config to the top level so any safetensors viewer shows them without decoding JSON.
QUICK_KEYS = ("method", "sigma_max", "optimizer")
RESERVED_KEYS = frozenset(
    {
        "format",
        "format_version",
        "arch",
        "model_config",
        "train_config",
        "metrics",
        "step",
        "lipcli_version",
        "tokenizer",
        "spectral_norms",
        *QUICK_KEYS,
    }
)
# Safetensors dtype codes a model may be cast to wholesale (a bf16 checkpoint loads as bf16).
MODEL_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
FLOAT_CODES = {"F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2"}
# What load() accepts: wider or mixed floats load as float32; fp8 files go through `lipcli convert`.
LOADABLE_CODES = {"F64", "F32", "BF16", "F16"}
# train_config fields other commands read back (activations, attack, convert), with the types they need.
_TRAIN_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "data": (str, type(None)),
    "val_data": (str, type(None)),
    "tokenizer": (str, type(None)),
    "seed": (int,),
    "val_fraction": (int, float),
}


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one line naming the file and what to do."""


@dataclass
class Checkpoint:
    model: nn.Module  # in eval() mode, on the device given to load()
    arch: str
    model_config: dict
    train_config: dict
    metrics: dict
    step: int
    spectral_norms: dict[str, float]  # RMS->RMS norms recorded at save time; NaN where non-finite
    tokenizer: dict | None
    metadata: dict[str, str]
    path: Path


def _lipcli_version() -> str:
    try:
        return version("lipcli")
    except PackageNotFoundError:
        return "0+unknown"


def _tensors_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors in their own dtype, none sharing storage (safetensors refuses sharing)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()  # a tied or viewed tensor: give it its own storage
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    train_config: dict | None = None,
    metrics: dict | None = None,
    step: int = 0,
    tokenizer: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Atomically write ``model`` and its metadata to ``path`` (parent directories are created)."""
    path = Path(path)
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the model and prefixes its names
    arch = getattr(model, "arch", None)
    if arch is None or not hasattr(model, "config"):
        raise ValueError(f"cannot save {type(model).__name__}: not a lipcli model (no arch/config)")
    extra = extra or {}
    clashes = sorted(RESERVED_KEYS & set(extra))
    if clashes:
        raise ValueError(f"extra metadata keys clash with reserved ones: {', '.join(clashes)}")
    train_config = train_config or {}
    norms = {name: float(rms_norm_exact(param).max()) for name, param in model.named_parameters() if param.dim() >= 2}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "arch": arch,
        "model_config": strict_json(config_dict(model)),
        "train_config": strict_json(train_config),
        "metrics": strict_json(metrics or {}),
        "step": str(int(step)),
        "lipcli_version": _lipcli_version(),
        "tokenizer": strict_json(tokenizer),
        "spectral_norms": strict_json(norms),
    }
    for key in QUICK_KEYS:
        if key in train_config:
            value = train_config[key]
            metadata[key] = value if isinstance(value, str) else strict_json(value)
    metadata.update({key: strict_json(value) for key, value in extra.items()})
    tensors = _tensors_for_save(model)
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """Metadata and name -> (shape, dtype code) from the header alone; no tensor data is read."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():  # a FIFO or device would block or stream forever
        raise CheckpointError(f"{path}: not a regular file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            layout = {}
            for name in f.keys():
                tensor_slice = f.get_slice(name)
                layout[name] = (list(tensor_slice.get_shape()), tensor_slice.get_dtype())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {one_line(exc)}"
        ) from exc
    return metadata, layout


def _check_format(path: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") == FP8_FORMAT:
        raise CheckpointError(
            f"{path}: an fp8 file from `lipcli convert`; convert it back first: lipcli convert {path} OUT.safetensors "
            "--dtype fp32"
        )
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a lipcli checkpoint (no lipcli metadata); for bare weights run "
            "`lipcli convert SRC DST.safetensors --preset NAME` (or --config JSON)"
        )
    raw = metadata.get("format_version", "")
    try:
        format_version = int(raw)
    except ValueError:
        raise CheckpointError(f"{path}: invalid format_version {raw!r} in metadata") from None
    if format_version < 1:
        raise CheckpointError(f"{path}: invalid format_version {raw!r} in metadata")
    if format_version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer lipcli (format_version {format_version}, this one reads "
            f"<= {FORMAT_VERSION}); upgrade lipcli"
        )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The raw metadata of a lipcli checkpoint, reading only the file header."""
    path = Path(path)
    metadata, _ = _read_header(path)
    _check_format(path, metadata)
    return metadata


_REQUIRED = object()


def _json_object(path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
    """Decode JSON-object metadata field ``key``; ``default`` when absent (an error if _REQUIRED) or null."""
    if key not in metadata:
        if default is _REQUIRED:
            raise CheckpointError(f"{path}: metadata field {key!r} is missing")
        return default
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata field {key!r} is not valid JSON ({exc})") from None
    if value is None and default is None:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata field {key!r} is not a JSON object")
    return value


def _first_mismatch(
    path: Path, layout: dict[str, tuple[list[int], str]], expected: dict[str, torch.Tensor]
) -> str | None:
    """A description of the first (in sorted name order) tensor the file and the config disagree on."""
    problems = []
    for name in sorted(set(layout) | set(expected)):
        if name not in layout:
            problems.append(f'missing tensor "{name}"')
        elif name not in expected:
            problems.append(f'unexpected tensor "{name}"')
        elif (shape := layout[name][0]) != list(expected[name].shape):
            problems.append(f'shape mismatch "{name}: file {shape} vs config {list(expected[name].shape)}"')
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{path}: tensors do not match model_config: {problems[0]}{more}"


def _check_dtypes(path: Path, layout: dict[str, tuple[list[int], str]]) -> None:
    for name, (_, code) in sorted(layout.items()):
        if code not in LOADABLE_CODES:
            raise CheckpointError(
                f'{path}: tensor "{name}" is stored as {code}; a checkpoint holds F32, BF16, F16 or F64 tensors'
                + (" (fp8 files load through `lipcli convert`)" if code in FLOAT_CODES else "")
            )


def _check_layer_count(path: Path, arch: str, model_config: dict, layout: dict[str, tuple[list[int], str]]) -> None:
    """The declared n_layers against the layers the file stores, before anything is built (a 70 KB file
    declaring a million layers would otherwise build them all)."""
    prefix = LAYER_LISTS[arch] + "."
    stored = {name[len(prefix) :].split(".")[0] for name in layout if name.startswith(prefix)}
    declared = model_config.get("n_layers")
    if isinstance(declared, int) and declared != len(stored):
        raise CheckpointError(
            f"{path}: model_config declares model.n_layers = {declared} but the file stores {len(stored)} "
            f"({prefix}N tensors)"
        )


def _check_train_config(path: Path, train_config: dict) -> None:
    for key, types in _TRAIN_FIELD_TYPES.items():
        value = train_config.get(key)
        if key in train_config and (not isinstance(value, types) or isinstance(value, bool)):
            raise CheckpointError(f"{path}: train_config field {key!r} has the wrong type ({value!r})")
    fraction = train_config.get("val_fraction", 0.5)
    if not 0 < fraction < 1:
        raise CheckpointError(f"{path}: train_config field 'val_fraction' must lie in (0, 1) (got {fraction!r})")


def checked_config(
    path: Path, arch: str, model_config: dict, layout: dict[str, tuple[list[int], str]]
) -> GPTConfig | MLPConfig:
    """The validated config, once its layers and every tensor shape match ``layout`` (name -> (shape, dtype)).

    Shapes are compared on the meta device, which allocates nothing: a file declaring more than it stores
    fails here, before a model is built.
    """
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{path}: model_config must be a JSON object of model fields")
    try:
        config = config_from_dict(arch, model_config)
    except UserError as exc:
        raise CheckpointError(f"{path}: bad model_config: {one_line(exc)}") from None
    _check_layer_count(path, arch, model_config, layout)
    with torch.device("meta"):
        mismatch = _first_mismatch(path, layout, build_model(arch, config, init=False).state_dict())
    if mismatch:
        raise CheckpointError(mismatch)
    return config


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or inf, or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite(path: Path, model: nn.Module) -> None:
    name = first_non_finite(model.state_dict())
    if name is not None:
        raise CheckpointError(
            f'{path}: tensor "{name}" holds NaN or infinite values: the weights are broken '
            "(a diverged run?); use an earlier checkpoint"
        )


def rebuild(path: Path, arch: str, model_config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """The fp32 model holding tensors ``state`` read from ``path``, checked as :func:`load` checks a file."""
    layout = {name: (list(t.shape), str(t.dtype)) for name, t in state.items()}
    model = build_model(arch, checked_config(path, arch, model_config, layout), init=False)
    model.load_state_dict({name: t.float() for name, t in state.items()}, strict=True)
    check_finite(path, model)
    return model.eval()


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from a checkpoint's metadata and weights, in eval mode, on ``device``."""
    path = Path(path)
    metadata, layout = _read_header(path)
    _check_format(path, metadata)
    # Decode every metadata field before touching tensor data, so a bad file fails fast.
    if "arch" not in metadata:
        raise CheckpointError(f"{path}: metadata field 'arch' is missing")
    arch = metadata["arch"]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    model_config = _json_object(path, metadata, "model_config", _REQUIRED)
    train_config = _json_object(path, metadata, "train_config", {})
    _check_train_config(path, train_config)
    metrics = _json_object(path, metadata, "metrics", {})
    tokenizer = _json_object(path, metadata, "tokenizer", None)
    norms = _json_object(path, metadata, "spectral_norms", {})
    try:
        step = int(metadata.get("step", "0"))
        spectral_norms = {name: math.nan if v is None else float(v) for name, v in norms.items()}
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid step or spectral_norms metadata: {one_line(exc)}") from exc
    _check_dtypes(path, layout)
    model = build_model(arch, checked_config(path, arch, model_config, layout), init=False)
    float_codes = {code for _, code in layout.values() if code in FLOAT_CODES}
    if len(float_codes) == 1 and (code := float_codes.pop()) in MODEL_DTYPES:
        model.to(MODEL_DTYPES[code])
    try:
        model.load_state_dict(safetensors.torch.load_file(path), strict=True)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: could not load the weights: {one_line(exc)}") from exc
    check_finite(path, model)
    return Checkpoint(
        model=model.to(device).eval(),
        arch=arch,
        model_config=config_dict(model),
        train_config=train_config,
        metrics=metrics,
        step=step,
        spectral_norms=spectral_norms,
        tokenizer=tokenizer,
        metadata=metadata,
        path=path,
    )


def optimizer_path(ckpt_path: str | os.PathLike[str]) -> Path:
    """The optimizer-state file that belongs to a checkpoint: ``<checkpoint>.optim.pt``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(ckpt_path.name + OPTIMIZER_SUFFIX)


def save_optimizer(path: str | os.PathLike[str], optimizer_state: dict, extra: dict) -> Path:
    """Atomically write the optimizer state (and ``extra``, e.g. RNG states) beside checkpoint ``path``.

    Only tensors, numbers, strings, None and dicts/lists/tuples of them may appear: the file is read
    back with ``weights_only=True``.
    """
    payload = {"format_version": FORMAT_VERSION, "optimizer": optimizer_state, "extra": extra}
    return atomic_write(optimizer_path(path), lambda tmp: torch.save(payload, tmp))


def load_optimizer(path: str | os.PathLike[str]) -> dict:
    """``{"optimizer": state_dict, "extra": dict}`` saved beside checkpoint ``path``, tensors on CPU."""
    optim = optimizer_path(path)
    if not optim.exists():
        raise CheckpointError(
            f"{optim}: no optimizer state beside the checkpoint; --resume needs the file training writes"
        )
    try:
        # weights_only: the file is data, never code. Any failure of the parser is the file's fault, and torch's
        # own message would advise weights_only=False, which must never be done with a file of unknown origin.
        payload = torch.load(optim, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{optim}: unreadable optimizer state (corrupt, truncated or not lipcli's: {type(exc).__name__}); "
            "train again without --resume"
        ) from exc
    if not (isinstance(payload, dict) and {"format_version", "optimizer", "extra"} <= set(payload)):
        raise CheckpointError(f"{optim}: not a lipcli optimizer-state file")
    format_version = payload["format_version"]
    if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
        raise CheckpointError(f"{optim}: unsupported format_version {format_version!r}; upgrade lipcli")
    return {"optimizer": payload["optimizer"], "extra": payload["extra"]}
