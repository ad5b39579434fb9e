"""Weights files as a conversion sees them: lipcli .safetensors (plain or fp8), torch .pt state dicts.

A reader returns a :class:`Source` (tensors plus whatever config and metadata the file carries), a writer
stores a model in either format atomically; ``load_fp8`` reads an fp8 file back as a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from . import checkpoint
from .errors import UserError
from .files import atomic_write, one_line
from .models import config_dict
from .precision import FP8, FP8_FORMAT, dequantize_fp8, dtype_name

WRITABLE = ("safetensors", "pt")
SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".npz": "npz"}
# Metadata keys a conversion consumes or rewrites instead of carrying them through.
_CONSUMED = checkpoint.RESERVED_KEYS | {"fp8_scales", "conversion"}


class ConvertError(UserError):
    """A conversion that cannot be done; the message is one line naming the file and what to do."""


@dataclass
class Source:
    """What a file holds, before a config is settled; tensors are dequantized but keep their dtype."""

    state_dict: dict[str, Tensor]
    arch: str | None
    model_config: dict | None
    train_config: dict
    metrics: dict
    step: int
    tokenizer: dict | None
    extra: dict[str, Any]
    dtype: str


def format_of(path: Path, role: str) -> str:
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    hint = " or pass --to" if role == "DST" else ""
    raise ConvertError(
        f"{path}: cannot tell the format from the extension {path.suffix or '(none)'!r}; "
        f"use .safetensors, .pt/.pth{' or .npz' if role == 'SRC' else ''}{hint}"
    )


def _dequantize_all(path: Path, tensors: dict[str, Tensor], scales: Any) -> dict[str, Tensor]:
    if not isinstance(scales, dict) or set(scales) != {n for n, t in tensors.items() if t.is_floating_point()}:
        raise ConvertError(f"{path}: fp8_scales metadata does not name exactly the file's float tensors")
    bad = [
        n for n, v in scales.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
    ]
    if bad:
        raise ConvertError(f"{path}: fp8_scales[{bad[0]!r}] must be a finite number > 0")
    return {name: dequantize_fp8(t, float(scales[name])) if name in scales else t for name, t in tensors.items()}


def json_field(path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
    """A JSON-object metadata field (``default`` when absent or null)."""
    if key not in metadata:
        return default
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ConvertError(f"{path}: metadata field {key!r} is not valid JSON") from None
    return _object_or_default(path, key, value, default)


def _object_or_default(path: Path, key: str, value: Any, default: Any) -> Any:
    if value is None:
        return default
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: metadata field {key!r} must be a JSON object")
    return value


def carried(metadata: dict[str, str]) -> dict[str, Any]:
    """Extra metadata written by other tools or features, decoded where it is JSON."""
    extra = {}
    for key, value in metadata.items():
        if key in _CONSUMED:
            continue
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    return extra


def header(path: Path) -> dict[str, str]:
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ConvertError(f"{path}: not a readable safetensors file: {one_line(exc)}") from exc


def read_safetensors(path: Path) -> Source:
    metadata = header(path)
    if metadata.get("format") == checkpoint.FORMAT:
        ckpt = checkpoint.load(path)
        state = {name: t.detach() for name, t in ckpt.model.state_dict().items()}
        return Source(
            state,
            ckpt.arch,
            ckpt.model_config,
            ckpt.train_config,
            ckpt.metrics,
            ckpt.step,
            ckpt.tokenizer,
            carried(ckpt.metadata),
            dtype_name(state),
        )
    tensors = safetensors.torch.load_file(path)
    if metadata.get("format") != FP8_FORMAT:
        return Source(tensors, None, None, {}, {}, 0, None, {}, dtype_name(tensors))
    try:
        step = int(metadata.get("step", "0"))
    except ValueError:
        raise ConvertError(f"{path}: invalid step {metadata['step']!r} in metadata") from None
    return Source(
        _dequantize_all(path, tensors, json_field(path, metadata, "fp8_scales", None)),
        metadata.get("arch"),
        json_field(path, metadata, "model_config", None),
        json_field(path, metadata, "train_config", {}),
        json_field(path, metadata, "metrics", {}),
        step,
        json_field(path, metadata, "tokenizer", None),
        carried(metadata),
        FP8,
    )


def _strip_wrapper_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the prefix torch.compile ("_orig_mod.") or DDP ("module.") adds to every name."""
    for prefix in ("_orig_mod.", "module."):
        if state and all(name.startswith(prefix) for name in state):
            state = {name.removeprefix(prefix): t for name, t in state.items()}
    return state


def read_pt(path: Path) -> Source:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ConvertError(
            f"{path}: not loadable with torch.load(weights_only=True) (only plain tensors and containers "
            f"are accepted): {one_line(exc)}"
        ) from exc
    lipcli_style = isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict)
    state = payload["state_dict"] if lipcli_style else payload
    if not (isinstance(state, dict) and state and all(isinstance(t, Tensor) for t in state.values())):
        raise ConvertError(
            f"{path}: not a state dict: expected name -> tensor, or lipcli's {{arch, model_config, state_dict}}"
        )
    meta = (payload.get("metadata") or {}) if lipcli_style else {}
    arch = payload.get("arch") if lipcli_style else None
    model_config = payload.get("model_config") if lipcli_style else None
    if not isinstance(meta, dict) or (
        arch is not None and not (isinstance(arch, str) and isinstance(model_config, dict))
    ):
        raise ConvertError(f"{path}: malformed lipcli .pt: needs a str arch, a dict model_config and a dict metadata")
    if not isinstance(meta.get("step", 0), int):
        raise ConvertError(f"{path}: metadata step must be an integer")
    state = _strip_wrapper_prefix(state)
    dtype = dtype_name(state)
    if "fp8_scales" in meta:
        state, dtype = _dequantize_all(path, state, meta["fp8_scales"]), FP8
    return Source(
        state,
        arch,
        model_config,
        _object_or_default(path, "train_config", meta.get("train_config"), {}),
        _object_or_default(path, "metrics", meta.get("metrics"), {}),
        meta.get("step", 0),
        _object_or_default(path, "tokenizer", meta.get("tokenizer"), None),
        _object_or_default(path, "extra", meta.get("extra"), {}),
        dtype,
    )


def write(
    dst: Path, fmt: str, model: nn.Module, tensors: dict[str, Tensor], scales: dict[str, float], source: Source
) -> None:
    meta = {
        "train_config": source.train_config,
        "metrics": source.metrics,
        "step": source.step,
        "tokenizer": source.tokenizer,
        "extra": source.extra,
    }
    if fmt == "pt":
        payload = {
            "arch": model.arch,
            "model_config": config_dict(model),
            "state_dict": tensors,
            "metadata": {**meta, **({"fp8_scales": scales} if scales else {})},
        }
        atomic_write(dst, lambda tmp: torch.save(payload, tmp))
        return
    if not scales:
        checkpoint.save(dst, model.to(next(iter(tensors.values())).dtype), **meta)
        return

    def write_fp8(tmp: Path) -> None:
        # save() writes lipcli's full metadata (from the dequantized model); then the fp8 tensors replace its data.
        checkpoint.save(tmp, model, **meta)
        with safe_open(tmp, framework="pt") as f:
            metadata = f.metadata()
        metadata.update({"format": FP8_FORMAT, "fp8_scales": json.dumps(scales)})
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)

    atomic_write(dst, write_fp8)


def load_fp8(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> checkpoint.Checkpoint:
    """Load a ``--dtype fp8-e4m3`` safetensors file: weights dequantized to fp32 (``checkpoint.load`` refuses it)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    metadata = header(path)
    if metadata.get("format") != FP8_FORMAT:
        raise ConvertError(f"{path}: not an fp8 checkpoint from `lipcli convert --dtype fp8-e4m3`")
    source = read_safetensors(path)
    if source.arch is None or source.model_config is None:
        raise ConvertError(f"{path}: fp8 checkpoint without arch/model_config metadata")
    model = checkpoint.rebuild(path, source.arch, source.model_config, source.state_dict)
    norms = json_field(path, metadata, "spectral_norms", {})
    return checkpoint.Checkpoint(
        model=model.to(device).eval(),
        arch=source.arch,
        model_config=config_dict(model),
        train_config=source.train_config,
        metrics=source.metrics,
        step=source.step,
        spectral_norms={name: math.nan if v is None else float(v) for name, v in norms.items()},
        tokenizer=source.tokenizer,
        metadata=metadata,
        path=path,
    )
