"""The reference implementation's checkpoints (github.com/Arongil/lipschitz-transformers, Modula on JAX).

It saves an ``.npz`` whose ``args`` is the run's config dict and whose ``weights_checkpoint_K`` maps each
index of Modula's flat weight list to an array; :func:`read_npz` maps them onto lipcli's LipschitzGPT
(see :func:`reference_gpt_state_dict`) or LipschitzMLP (the reference's CIFAR runs).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .files import one_line
from .models import LipschitzGPT, LipschitzMLP
from .weightfiles import ConvertError, Source

# The reference's dataset names and tokenizers in lipcli's terms (fineweb shards have no default path).
REFERENCE_DATA = {"shakespeare": ("tinyshakespeare", "char"), "cifar": ("cifar10", "char")}


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


def read_npz(path: Path, allow_pickle: bool, index: int | None) -> Source:
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
    arch = LipschitzMLP.arch if mlp else LipschitzGPT.arch
    return Source(state, arch, model_config, _plain(train_config), {}, 0, None, extra, "fp32")
