"""Convert weights between lipcli ``.safetensors``, torch ``.pt`` state dicts and the reference's ``.npz``.

Every conversion rebuilds the lipcli model from a config (the file's own, ``config``, or a preset's
with vocabulary and width read off the tensors), checks every tensor against it, optionally
projects the weights onto the paper's constraint, casts them, and writes the result atomically:
a failed conversion never leaves a file at the destination.

fp8 (``float8_e4m3fn``) output stores ``w / scale`` with ``scale = max|w| / 448`` per tensor and the
scales in the ``fp8_scales`` metadata. ``checkpoint.load`` would read those scaled values as if they
were the weights, so fp8 files are marked ``format = "lipcli-fp8"`` (which it refuses) and are read
back with :func:`load_fp8` or converted back with ``lipcli convert``.

The reference implementation (github.com/Arongil/lipschitz-transformers, Modula on JAX) saves an
``.npz`` whose ``args`` is the run's config dict and whose ``weights_checkpoint_K`` maps each index
of Modula's flat weight list to an array (see :func:`reference_gpt_state_dict`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from . import checkpoint
from .constraints import CapContext, get_method, project
from .data import DataError
from .errors import UserError
from .files import atomic_write, check_writable, one_line
from .models import build_model, config_dict, max_weight_norm
from .nn import Embedding, HeadLinear, Linear
from .optim import cap_embedding_rows
from .presets import Preset, PresetError, TrainConfig, load_preset
from .training import evaluate, make_task

WRITABLE = ("safetensors", "pt")
SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".npz": "npz"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8-e4m3": torch.float8_e4m3fn}
FP8 = "fp8-e4m3"
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_FORMAT = "lipcli-fp8"
EVAL_BATCH_SIZE = 8
# The reference's dataset names and tokenizers in lipcli's terms (fineweb shards have no default path).
REFERENCE_DATA = {"shakespeare": ("tinyshakespeare", "char"), "cifar": ("cifar10", "char")}
# Metadata keys a conversion consumes or rewrites instead of carrying them through.
_CONSUMED = checkpoint.RESERVED_KEYS | {"fp8_scales", "conversion"}


class ConvertError(UserError):
    """A conversion that cannot be done; the message is one line naming the file and what to do."""


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


@dataclass
class _Source:
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


def _dtype_name(tensors: dict[str, Tensor]) -> str:
    """The single storage dtype of the float tensors, or fp32 when they are mixed."""
    found = {t.dtype for t in tensors.values() if t.is_floating_point()}
    names = [name for name, dtype in DTYPES.items() if {dtype} == found]
    return names[0] if names else "fp32"


def quantize_fp8(tensor: Tensor) -> tuple[Tensor, float]:
    """``(tensor / scale)`` as float8_e4m3fn and ``scale = max|tensor| / 448`` (1 for an all-zero tensor)."""
    wide = tensor.detach().double()
    peak = float(wide.abs().max())
    scale = peak / FP8_MAX if peak > 0 else 1.0
    # Rounding in the division can land a hair above 448; e4m3fn has no inf to absorb it.
    return (wide / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(tensor: Tensor, scale: float) -> Tensor:
    return (tensor.double() * scale).float()


def _dequantize_all(path: Path, tensors: dict[str, Tensor], scales: Any) -> dict[str, Tensor]:
    if not isinstance(scales, dict) or set(scales) != {n for n, t in tensors.items() if t.is_floating_point()}:
        raise ConvertError(f"{path}: fp8_scales metadata does not name exactly the file's float tensors")
    bad = [
        n for n, v in scales.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
    ]
    if bad:
        raise ConvertError(f"{path}: fp8_scales[{bad[0]!r}] must be a finite number > 0")
    return {name: dequantize_fp8(t, float(scales[name])) if name in scales else t for name, t in tensors.items()}


def _json_field(path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
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


def _carried(metadata: dict[str, str]) -> dict[str, Any]:
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


def _header(path: Path) -> dict[str, str]:
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ConvertError(f"{path}: not a readable safetensors file: {one_line(exc)}") from exc


def _read_safetensors(path: Path) -> _Source:
    metadata = _header(path)
    if metadata.get("format") == checkpoint.FORMAT:
        ckpt = checkpoint.load(path)
        state = {name: t.detach() for name, t in ckpt.model.state_dict().items()}
        return _Source(
            state,
            ckpt.arch,
            ckpt.model_config,
            ckpt.train_config,
            ckpt.metrics,
            ckpt.step,
            ckpt.tokenizer,
            _carried(ckpt.metadata),
            _dtype_name(state),
        )
    tensors = safetensors.torch.load_file(path)
    if metadata.get("format") != FP8_FORMAT:
        return _Source(tensors, None, None, {}, {}, 0, None, {}, _dtype_name(tensors))
    try:
        step = int(metadata.get("step", "0"))
    except ValueError:
        raise ConvertError(f"{path}: invalid step {metadata['step']!r} in metadata") from None
    return _Source(
        _dequantize_all(path, tensors, _json_field(path, metadata, "fp8_scales", None)),
        metadata.get("arch"),
        _json_field(path, metadata, "model_config", None),
        _json_field(path, metadata, "train_config", {}),
        _json_field(path, metadata, "metrics", {}),
        step,
        _json_field(path, metadata, "tokenizer", None),
        _carried(metadata),
        FP8,
    )


def _strip_wrapper_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the prefix torch.compile ("_orig_mod.") or DDP ("module.") adds to every name."""
    for prefix in ("_orig_mod.", "module."):
        if state and all(name.startswith(prefix) for name in state):
            state = {name.removeprefix(prefix): t for name, t in state.items()}
    return state


def _read_pt(path: Path) -> _Source:
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
    dtype = _dtype_name(state)
    if "fp8_scales" in meta:
        state, dtype = _dequantize_all(path, state, meta["fp8_scales"]), FP8
    return _Source(
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


def _rope_permutation(head_dim: int) -> Tensor:
    """Row order taking Modula's half-split RoPE pairs (i, i + d/2) to lipcli's interleaved (2i, 2i + 1).

    Modula's Rope.rotate maps (a, b) = (x[d/2 + i], x[i]) to (cos a + sin b, -sin a + cos b) at positions
    (i, d/2 + i); lipcli rotates (x[2i], x[2i+1]) the other way. With lipcli x[2i] = b, x[2i+1] = a both
    give q.k the same rotation by the relative position, so the attention scores are identical.
    """
    half = torch.arange(head_dim // 2)
    return torch.stack((half, half + head_dim // 2), dim=-1).flatten()


def _expect(weights: list[np.ndarray], index: int, shape: tuple[int, ...], role: str) -> Tensor:
    if weights[index].shape != shape:
        raise ConvertError(
            f"reference weight {index} ({role}) has shape {list(weights[index].shape)}, "
            f"expected {list(shape)} from the file's args"
        )
    return torch.from_numpy(weights[index]).float()


def reference_gpt_state_dict(weights: list[np.ndarray], args: dict) -> tuple[dict, dict[str, Tensor]]:
    """lipcli LipschitzGPT config and state dict from Modula's flat GPT weight list.

    Layout read from Arongil/lipschitz-transformers ``modula/compound.py`` (``GPT``, ``Attention``),
    ``modula/atom.py`` (``Linear``, ``Embed``, ``Unembed``) and ``modula/abstract.py``: ``a @ b`` lists
    b's weights before a's, so the list is in data order: ``[embed [d, vocab]]``, then per block ``v, q, k``
    ([d, d], rows head-major, split by ``SplitIntoHeads``), ``w`` (the output projection, [d, d]),
    ``mlp_in`` [4d, d], ``mlp_out`` [d, 4d], and last ``out`` [vocab, d] (Unembed or Linear, same shape).
    Every Linear computes ``x @ W.T``, as torch does. The list runs in data order even though Modula's
    tracker names number the blocks backwards (``blocks @= block_i`` puts block i first).
    """
    if args.get("layernorm_substitute", "none") != "none":
        raise ConvertError(
            f"reference layernorm_substitute={args['layernorm_substitute']!r} has no lipcli equivalent; "
            "only 'none' (the paper's models) converts"
        )
    try:
        d, heads, blocks, vocab = (int(args[k]) for k in ("d_embed", "num_heads", "num_blocks", "vocab_size"))
    except KeyError as exc:
        raise ConvertError(f"reference args lack {exc.args[0]!r}; cannot rebuild the model") from None
    if min(d, heads, blocks, vocab) < 1 or d % heads:
        raise ConvertError(
            f"reference args d_embed={d}, num_heads={heads}, num_blocks={blocks}, vocab_size={vocab} describe "
            "no GPT: each must be >= 1 and num_heads must divide d_embed"
        )
    if len(weights) != 2 + 6 * blocks:
        raise ConvertError(
            f"reference checkpoint holds {len(weights)} weights; a {blocks}-block GPT has {2 + 6 * blocks}"
        )
    head_dim = d // heads
    perm = _rope_permutation(head_dim)
    state = {"embed.weight": _expect(weights, 0, (d, vocab), "embedding").T.contiguous()}
    for i in range(blocks):
        base, prefix = 1 + 6 * i, f"blocks.{i}"
        v, q, k = (_expect(weights, base + j, (d, d), f"block {i} {n}") for j, n in enumerate("vqk"))
        state[f"{prefix}.attn.inner.q.weight"] = q.view(heads, head_dim, d)[:, perm].contiguous()
        state[f"{prefix}.attn.inner.k.weight"] = k.view(heads, head_dim, d)[:, perm].contiguous()
        state[f"{prefix}.attn.inner.v.weight"] = v.view(heads, head_dim, d).contiguous()
        state[f"{prefix}.attn.inner.o.weight"] = _expect(weights, base + 3, (d, d), f"block {i} attention out")
        state[f"{prefix}.mlp.inner.fc_in.weight"] = _expect(weights, base + 4, (4 * d, d), f"block {i} mlp_in")
        state[f"{prefix}.mlp.inner.fc_out.weight"] = _expect(weights, base + 5, (d, 4 * d), f"block {i} mlp_out")
    state["head.weight"] = _expect(weights, len(weights) - 1, (vocab, d), "unembedding")
    model_config = {
        "vocab_size": vocab,
        "d_model": d,
        "n_layers": blocks,
        "n_heads": heads,
        "context": int(args.get("seq_len", 256)),
        "mlp_ratio": 4,
        # Modula's GPT() defaults, for args that predate a field.
        "residual_scale": float(args.get("residual_scale", 1.0)),
        "softmax_scale": float(args.get("softmax_scale", 1.0)),
        "final_scale": float(args.get("final_scale", 1.0)),
        "zero_init": bool(args.get("zero_init", False)),
        "seed": int(args.get("seed", 0)),
    }
    return model_config, state


def reference_mlp_state_dict(weights: list[np.ndarray], args: dict) -> tuple[dict, dict[str, Tensor]]:
    """lipcli LipschitzMLP from Modula's ``MLP`` (compound.py): Linear layers in data order, ReLU between."""
    if len(weights) != int(args.get("num_blocks", len(weights))) or len(weights) < 2:
        raise ConvertError(f"reference MLP checkpoint holds {len(weights)} weights, args say {args.get('num_blocks')}")
    if any(w.ndim != 2 for w in weights):
        raise ConvertError("reference MLP weights must all be matrices")
    state = {f"layers.{i}.weight": torch.from_numpy(w).float() for i, w in enumerate(weights)}
    model_config = {
        "input_dim": weights[0].shape[1],
        "hidden": weights[0].shape[0],
        "n_layers": len(weights),
        "num_classes": weights[-1].shape[0],
        "final_scale": float(args.get("final_scale", 1.0)),
        "seed": int(args.get("seed", 0)),
    }
    return model_config, state


def _plain(value: Any) -> Any:
    """``value`` as JSON types (the reference's args may hold numpy scalars)."""
    return json.loads(json.dumps(value, default=repr))


def _read_npz(path: Path, allow_pickle: bool, index: int | None) -> _Source:
    if not allow_pickle:
        raise ConvertError(
            f"{path}: the reference's .npz stores its args and weights as pickled objects, and unpickling can "
            "run arbitrary code; pass --allow-pickle only for a file you trust"
        )
    if not zipfile.is_zipfile(path):
        # np.load(allow_pickle=True) would unpickle a non-zip file whole.
        raise ConvertError(f"{path}: not an .npz archive")
    prefix = "weights_checkpoint_"
    try:
        with np.load(path, allow_pickle=True) as archive:
            names = archive.files
            available = sorted(
                int(k[len(prefix) :]) for k in names if k.startswith(prefix) and k[len(prefix) :].isdigit()
            )
            chosen = available[-1] if index is None and available else index
            complete = "args" in names and chosen in available
            # Only the two entries needed are unpickled, and only once both are known to exist.
            args = archive["args"].item() if complete else None
            by_index = archive[f"{prefix}{chosen}"].item() if complete else None
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, ImportError, AttributeError) as exc:
        raise ConvertError(f"{path}: unreadable reference checkpoint: {one_line(exc)}") from exc
    if "args" not in names or not available:
        raise ConvertError(f"{path}: not a reference checkpoint (needs 'args' and '{prefix}K' entries)")
    if not complete:
        raise ConvertError(f"{path}: no {prefix}{chosen}; it holds {available}")
    if not isinstance(args, dict) or not isinstance(by_index, dict) or set(by_index) != set(range(len(by_index))):
        raise ConvertError(f"{path}: 'args' must be a dict and the weights a dict indexed 0..n-1")
    try:
        # Modula's save converts JAX arrays to nested lists (jax_to_numpy); arrays pass through as well.
        weights = [np.asarray(by_index[i], dtype=np.float32) for i in range(len(by_index))]
    except (TypeError, ValueError) as exc:
        raise ConvertError(f"{path}: weights are not numeric arrays: {one_line(exc)}") from exc
    mlp = args.get("data") == "cifar"
    try:
        model_config, state = (reference_mlp_state_dict if mlp else reference_gpt_state_dict)(weights, args)
    except ConvertError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # args of the wrong type, e.g. d_embed "abc"
        raise ConvertError(f"{path}: reference args do not describe a model: {one_line(exc)}") from exc
    data, tokenizer = REFERENCE_DATA.get(str(args.get("data")), (None, "char"))
    train_config = {
        "data": data,
        "tokenizer": tokenizer,
        "optimizer": args.get("optimizer"),
        "sigma_max": args.get("w_max"),
        "lr": args.get("lr"),
        "wd": args.get("wd"),
        "steps": args.get("steps"),
        "seed": args.get("seed", 0),
    }
    extra = {"reference_args": _plain(args), "reference_checkpoint": chosen}
    arch = "lipschitz-mlp" if mlp else "lipschitz-gpt"
    return _Source(state, arch, model_config, _plain(train_config), {}, 0, None, extra, "fp32")


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
    if arch in ("lipschitz-gpt", "baseline-gpt") and len(shapes.get("embed.weight", ())) == 2:
        found = dict(zip(("vocab_size", "d_model"), shapes["embed.weight"], strict=True))
    layers = sorted(int(n.split(".")[1]) for n in shapes if n.startswith("layers.") and n.endswith(".weight"))
    if arch == "lipschitz-mlp" and layers and len(shapes["layers.0.weight"]) == 2:
        found = {"input_dim": shapes["layers.0.weight"][1], "num_classes": shapes[f"layers.{layers[-1]}.weight"][0]}
    return {**found, **fields}


def _settle_config(source: _Source, src: Path, config: str | None, preset: str | None) -> tuple[str, dict]:
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
            '--config \'{"arch": "lipschitz-gpt", ...}\''
        )
    return arch, _inferred(arch, fields, source.state_dict)


def _build(arch: str, model_config: dict, state: dict[str, Tensor], src: Path) -> nn.Module:
    """The fp32 model with ``state`` loaded, after checking every name and shape against the config."""
    layout = {name: (list(t.shape), str(t.dtype)) for name, t in state.items()}
    model = build_model(arch, checkpoint.checked_config(src, arch, model_config, layout), init=False)
    model.load_state_dict({name: t.float() for name, t in state.items()}, strict=True)
    checkpoint.check_finite(src, model)
    return model.eval()


@torch.no_grad()
def project_model(model: nn.Module, method: str, sigma_max: float) -> None:
    """Project every weight matrix onto sigma_max with ``method``; cap embedding rows at unit RMS."""
    for module in model.modules():
        if isinstance(module, Embedding):
            module.weight.copy_(cap_embedding_rows(module.weight))
        elif isinstance(module, (Linear, HeadLinear)):
            module.weight.copy_(project(module.weight, method, CapContext(sigma_max)))


def _eval_batches(
    arch: str, model_config: dict, train_config: dict, data: str, tokenizer: dict | None, n: int
) -> list[tuple[Tensor, Tensor]]:
    t = TrainConfig(
        data=data,
        val_data=train_config.get("val_data"),
        tokenizer=train_config.get("tokenizer") or "char",
        val_fraction=float(train_config.get("val_fraction") or 0.1),
        batch_size=EVAL_BATCH_SIZE,
        eval_batches=n,
        seed=int(train_config.get("seed") or 0),
        device="cpu",
    )
    task = make_task(Preset("convert", "", arch, model_config, t))
    if tokenizer is not None and task.tokenizer_dict() not in (None, tokenizer):
        raise DataError(f"{data}: its tokenizer differs from the checkpoint's, so a val loss would mean nothing")
    vocab = model_config.get("vocab_size")
    if vocab is not None and getattr(task, "vocab_size", 0) > vocab:
        raise DataError(f"{data}: its vocabulary ({task.vocab_size}) is larger than the model's ({vocab})")
    return list(task.eval_batches(torch.device("cpu")))


def _val_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    return evaluate(model, iter(batches), torch.autocast("cpu", enabled=False))["val_loss"]


def _stored(model: nn.Module, dtype: str) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The tensors to write in ``dtype`` and, for fp8, their scales; ``model`` then holds exactly those values."""
    tensors, scales = {}, {}
    for name, t in model.state_dict().items():
        if dtype == FP8:
            tensors[name], scales[name] = quantize_fp8(t)
        else:
            tensors[name] = t.detach().to(DTYPES[dtype]).contiguous()
    stored = {n: dequantize_fp8(t, scales[n]) if n in scales else t.float() for n, t in tensors.items()}
    model.load_state_dict(stored, strict=True)
    return tensors, scales


def _write(
    dst: Path, fmt: str, model: nn.Module, tensors: dict[str, Tensor], scales: dict[str, float], source: _Source
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


def _validate_options(dtype: str | None, method: str | None, sigma_max: float | None, eval_batches: int) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if method is None and sigma_max is not None:
        raise ConvertError("--sigma-max needs --project METHOD")
    if method is not None:
        if not get_method(method).enforces:
            raise ConvertError(f"--project {method} does not bound the norms; use svd, hardcap, normalize or softcap")
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
    readers = {"safetensors": _read_safetensors, "pt": _read_pt}
    source = _read_npz(src, allow_pickle, npz_checkpoint) if src_format == "npz" else readers[src_format](src)
    try:
        arch, model_config = _settle_config(source, src, config, preset)
    except PresetError as exc:
        raise ConvertError(str(exc)) from None
    model = _build(arch, model_config, source.state_dict, src)
    if method is not None and not arch.startswith("lipschitz-"):
        raise ConvertError(
            f"--project applies to lipschitz-* models; {arch}'s RMSNorm makes its certificate infinite "
            "whatever the weights"
        )
    batches, eval_note = None, None
    eval_data = data or (source.train_config.get("data") if method is not None else None)
    if eval_data and eval_batches > 0:
        try:
            batches = _eval_batches(
                arch, config_dict(model), source.train_config, eval_data, source.tokenizer, eval_batches
            )
        except (DataError, OSError) as exc:
            if data is not None:
                raise
            eval_note = f"no val loss: the checkpoint's data {eval_data!r} is unavailable ({one_line(exc)})"
    loss_before = _val_loss(model, batches) if batches else None
    sigma_before = max_weight_norm(model) if method is not None else None
    if method is not None:
        project_model(model, method, sigma_max)
    out_dtype = dtype or source.dtype
    tensors, scales = _stored(model, out_dtype)
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
    _write(dst, dst_format, model, tensors, scales, source)
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


def load_fp8(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> checkpoint.Checkpoint:
    """Load a ``--dtype fp8-e4m3`` safetensors file: weights dequantized to fp32 (``checkpoint.load`` refuses it)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    metadata = _header(path)
    if metadata.get("format") != FP8_FORMAT:
        raise ConvertError(f"{path}: not an fp8 checkpoint from `lipcli convert --dtype fp8-e4m3`")
    source = _read_safetensors(path)
    if source.arch is None or source.model_config is None:
        raise ConvertError(f"{path}: fp8 checkpoint without arch/model_config metadata")
    model = _build(source.arch, source.model_config, source.state_dict, path)
    norms = _json_field(path, metadata, "spectral_norms", {})
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
