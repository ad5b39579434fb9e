"""Convert weights between lipcli ``.safetensors``, torch ``.pt`` state dicts and the reference's ``.npz``.

Every conversion rebuilds the lipcli model from a config (the file's own, ``config``, or a preset's
with vocabulary and width read off the tensors), checks every tensor against it (``checkpoint.load``
for lipcli files, ``checkpoint.rebuild`` for the rest), optionally projects the weights onto the
paper's constraint (lipcli.projection), casts them (lipcli.precision), and writes the result
atomically: a failed conversion never leaves a file at the destination.

Reading and writing each format lives in lipcli.weightfiles, the reference's ``.npz`` mapping in
lipcli.reference; fp8 files are read back with :func:`lipcli.weightfiles.load_fp8`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint
from .constraints import get_method
from .data import DataError
from .files import check_writable, one_line
from .models import ARCHITECTURES, IMAGES, TOKENS, LipschitzGPT, config_dict, max_weight_norm
from .precision import DTYPES, stored_tensors
from .presets import PresetError, load_preset
from .projection import ENFORCING, project_model
from .reference import read_npz
from .training import evaluate
from .validation import checkpoint_batches
from .weightfiles import WRITABLE, ConvertError, Source, format_of, read_pt, read_safetensors, write

EVAL_BATCH_SIZE = 8


@dataclass
class ConvertResult:
    src: str
    dst: str
    src_format: str
    dst_format: str
    arch: str
    dtype: str
    tensors: int
    parameters: int
    projection: str | None
    sigma_max: float | None
    max_sigma_before: float | None
    max_sigma_after: float | None
    val_loss_before: float | None
    val_loss_after: float | None
    eval_note: str | None  # why no val loss was computed, when one could have been

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_config(text: str) -> tuple[str, dict]:
    """``--config``: a JSON object (or a file holding one) with "arch" and model fields."""
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ConvertError(f"--config: {text!r} is neither a JSON object nor an existing file")
        text = path.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConvertError(f"--config: invalid JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("arch"), str):
        raise ConvertError('--config must be a JSON object with an "arch" string and model fields')
    fields = dict(raw)
    return fields.pop("arch"), fields


def _inferred(arch: str, fields: dict, state: dict[str, Tensor]) -> dict:
    """``fields`` plus the data-dependent sizes a preset leaves out, read off the tensor shapes."""
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    found: dict[str, int] = {}
    # An unknown arch finds nothing here; checkpoint.rebuild then names it.
    kind = ARCHITECTURES[arch][0].input_kind if arch in ARCHITECTURES else None
    if kind == TOKENS and len(shapes.get("embed.weight", ())) == 2:
        found = dict(zip(("vocab_size", "d_model"), shapes["embed.weight"], strict=True))
    layers = sorted(int(n.split(".")[1]) for n in shapes if n.startswith("layers.") and n.endswith(".weight"))
    if kind == IMAGES and layers and len(shapes["layers.0.weight"]) == 2:
        found = {"input_dim": shapes["layers.0.weight"][1], "num_classes": shapes[f"layers.{layers[-1]}.weight"][0]}
    return {**found, **fields}


def _settle_config(source: Source, src: Path, config: str | None, preset: str | None) -> tuple[str, dict]:
    if config is not None and preset is not None:
        raise ConvertError("give --config or --preset, not both")
    if source.arch is not None and (config is not None or preset is not None):
        raise ConvertError(f"{src} carries its own config ({source.arch}); drop --config/--preset")
    if source.arch is not None:
        return source.arch, dict(source.model_config or {})
    if config is not None:
        arch, fields = _parse_config(config)
    elif preset is not None:
        chosen = load_preset(preset)
        arch, fields = chosen.arch, dict(chosen.model)
        source.train_config = {**asdict(chosen.train), "preset": chosen.name, "arch": chosen.arch}
    else:
        raise ConvertError(
            f"{src} holds bare tensors without a model config; pass --preset NAME or "
            f'--config \'{{"arch": "{LipschitzGPT.arch}", ...}}\''
        )
    return arch, _inferred(arch, fields, source.state_dict)


def _either(names: tuple[str, ...]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass
class _Trained:
    """A conversion's source in the shape :func:`lipcli.validation.checkpoint_batches` reads."""

    model: nn.Module
    model_config: dict
    train_config: dict
    tokenizer: dict | None


def _eval_batches(model: nn.Module, source: Source, data: str | None, n: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` validation batches of ``data``, or of the data the source was trained on."""
    trained = _Trained(model, config_dict(model), source.train_config, source.tokenizer)
    return checkpoint_batches(trained, data, EVAL_BATCH_SIZE, n)[0]


def _val_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    return evaluate(model, iter(batches), torch.autocast("cpu", enabled=False))["val_loss"]


def _validate_options(dtype: str | None, method: str | None, sigma_max: float | None, eval_batches: int) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if method is None and sigma_max is not None:
        raise ConvertError("--sigma-max needs --project METHOD")
    if method is not None:
        if not get_method(method).enforces:
            raise ConvertError(f"--project {method} does not bound the norms; use {_either(ENFORCING)}")
        if sigma_max is None or not 0 < sigma_max < math.inf:
            raise ConvertError(f"--project needs a finite --sigma-max > 0 (got {sigma_max})")
    if eval_batches < 0:
        raise ConvertError(f"--eval-batches must be >= 0 (got {eval_batches})")


def _check_paths(src: Path, dst: Path) -> None:
    if src.is_dir():
        raise ConvertError(f"{src}: is a directory, not a weights file")
    if not src.exists():
        raise ConvertError(f"{src}: no such file")
    if not src.is_file():  # a FIFO or device would block or stream forever
        raise ConvertError(f"{src}: not a regular file")
    # samefile sees through symlinks, hard links and different spellings of one path.
    if dst.exists() and os.path.samefile(src, dst):
        raise ConvertError(f"{dst}: is the source file {src}; convert never overwrites its input, write elsewhere")
    check_writable(dst, "DST")


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    dtype: str | None = None,
    config: str | None = None,
    preset: str | None = None,
    method: str | None = None,
    sigma_max: float | None = None,
    data: str | None = None,
    eval_batches: int = 4,
    allow_pickle: bool = False,
    npz_checkpoint: int | None = None,
) -> ConvertResult:
    """Convert ``src`` to ``dst`` (see the module docstring); nothing is written unless every step succeeds.

    ``dtype`` defaults to the source's. Val losses are measured on ``data`` when given, or on the
    checkpoint's training data when projecting (skipped, with a note, if that data cannot be read).
    """
    src, dst = Path(src), Path(dst)
    _validate_options(dtype, method, sigma_max, eval_batches)
    if to is not None and to not in WRITABLE:
        raise ConvertError(f"unknown --to {to!r}; choose safetensors or pt")
    _check_paths(src, dst)
    src_format, dst_format = format_of(src, "SRC"), to or format_of(dst, "DST")
    if dst_format not in WRITABLE:
        raise ConvertError(f"{dst}: cannot write {dst_format}; write .safetensors or .pt")
    if npz_checkpoint is not None and src_format != "npz":
        raise ConvertError(f"--npz-checkpoint picks a weights_checkpoint_K of a reference .npz; {src} is {src_format}")
    readers = {"safetensors": read_safetensors, "pt": read_pt}
    source = read_npz(src, allow_pickle, npz_checkpoint) if src_format == "npz" else readers[src_format](src)
    try:
        arch, model_config = _settle_config(source, src, config, preset)
    except PresetError as exc:
        raise ConvertError(str(exc)) from None
    model = checkpoint.rebuild(src, arch, model_config, source.state_dict)
    if method is not None and not hasattr(model, "bound"):  # certification's own test for a certified model
        raise ConvertError(
            f"--project applies to lipschitz-* models; {arch}'s RMSNorm makes its certificate infinite "
            "whatever the weights"
        )
    batches, eval_note = None, None
    eval_data = data or (source.train_config.get("data") if method is not None else None)
    if eval_data and eval_batches > 0:
        try:
            batches = _eval_batches(model, source, data, eval_batches)
        except (DataError, OSError) as exc:
            if data is not None:
                raise
            eval_note = f"no val loss: the checkpoint's data {eval_data!r} is unavailable ({one_line(exc)})"
    loss_before = _val_loss(model, batches) if batches else None
    sigma_before = max_weight_norm(model) if method is not None else None
    if method is not None:
        project_model(model, method, sigma_max)
    out_dtype = dtype or source.dtype
    tensors, scales = stored_tensors(model, out_dtype)
    sigma_after = max_weight_norm(model) if method is not None else None
    loss_after = _val_loss(model, batches) if batches else None
    if method is not None or (out_dtype != source.dtype and out_dtype != "fp32"):
        # The source's metrics described other weights; keep them only as a record.
        source.extra["source_metrics"] = source.metrics
        source.metrics = {k: v for k, v in {"max_sigma": sigma_after, "val_loss": loss_after}.items() if v is not None}
    source.extra["conversion"] = {
        "source": str(src),
        "source_format": src_format,
        "dtype": out_dtype,
        "projection": method,
        "sigma_max": sigma_max,
    }
    write(dst, dst_format, model, tensors, scales, source)
    return ConvertResult(
        src=str(src),
        dst=str(dst),
        src_format=src_format,
        dst_format=dst_format,
        arch=arch,
        dtype=out_dtype,
        tensors=len(tensors),
        parameters=sum(t.numel() for t in tensors.values()),
        projection=method,
        sigma_max=sigma_max,
        max_sigma_before=sigma_before,
        max_sigma_after=sigma_after,
        val_loss_before=loss_before,
        val_loss_after=loss_after,
        eval_note=eval_note,
    )
