"""Named presets (``models/*.toml``, installed as ``lipcli.model_presets``) and command-line overrides."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError
from .models import config_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

DEFAULT_PRESET = "shakespeare-cpu"


class PresetError(UserError):
    """A preset that cannot be found or parsed, or an override that does not fit it."""


@dataclass
class TrainConfig:
    """Everything about a run that is not the model's shape. Every field is a preset key under [train]."""

    data: str | None = None  # file path, dataset name, "digits"/"cifar10", or a token-shard glob
    val_data: str | None = None  # token-shard glob for validation (shard training only)
    tokenizer: str = "char"
    val_fraction: float = 0.1
    optimizer: str = "muon"
    method: str = "softcap"
    sigma_max: float = 1.0  # cap on every matrix's RMS->RMS operator norm (the paper's w_max)
    caps: dict[str, float] = field(default_factory=dict)  # per-group caps overriding sigma_max
    lr_mult: dict[str, float] = field(default_factory=dict)  # per-group learning-rate multipliers
    embed_inflation: float = 16.0  # Muon: the most a rare token's (row-normalized) embedding step is scaled up
    blocks_mass: float | None = None  # Modula-style lr split between embed/head and blocks (None: even)
    lr: float = 0.1
    wd: float = 0.0
    steps: int = 1000
    batch_size: int = 32
    warmup: int = 0
    schedule: str = "linear"  # linear decay to 0, cosine, or constant after warm-up
    eval_every: int = 100
    eval_batches: int = 16
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    compile: bool = False
    # data = "recall" (lipcli/recall.py, MQAR): key and value vocabularies, pairs listed, keys asked per sequence.
    recall_keys: int = 32
    recall_values: int = 32
    recall_pairs: int = 8
    recall_queries: int = 8


@dataclass
class Preset:
    name: str
    description: str
    arch: str
    model: dict[str, Any]
    train: TrainConfig


def available() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("lipcli.model_presets").iterdir()
        if p.name.endswith(".toml")
    )


def _read_toml(name_or_path: str) -> tuple[str, dict]:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise PresetError(f"preset file not found: {path}")
        text, name = path.read_text(), path.stem
    else:
        resource = resources.files("lipcli.model_presets") / f"{name_or_path}.toml"
        if not resource.is_file():
            raise PresetError(f"unknown preset {name_or_path!r}; available: {', '.join(available())}")
        text, name = resource.read_text(), name_or_path
    try:
        return name, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"preset {name}: invalid TOML: {exc}") from None


def load_preset(name_or_path: str = DEFAULT_PRESET) -> Preset:
    name, raw = _read_toml(name_or_path)
    model = dict(raw.get("model", {}))
    arch = model.pop("arch", None)
    if arch is None:
        raise PresetError(f"preset {name}: [model] needs an arch")
    preset = Preset(name, raw.get("description", ""), arch, model, TrainConfig())
    return apply_overrides(preset, {f"train.{k}": v for k, v in raw.get("train", {}).items()})


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Parse a command-line string into the type of the field it overrides."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value if current is None else _fail(key, value)
    if isinstance(current, bool) and not isinstance(parsed, bool):
        _fail(key, value)
    if isinstance(current, float) and isinstance(parsed, int):
        return float(parsed)
    return parsed


def _fail(key: str, value: str) -> Any:
    raise PresetError(f"cannot parse {value!r} for {key}")


def apply_overrides(preset: Preset, overrides: dict[str, Any]) -> Preset:
    """Apply ``{"model.final_scale": 8, "train.lr": "0.05", "sigma_max": 2}``; bare keys find their section."""
    train_fields = {f.name: f for f in fields(TrainConfig)}
    model_fields = set(config_from_dict(preset.arch, {}).__dataclass_fields__)
    model, train_values = dict(preset.model), {}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if section not in ("", "model", "train"):
            raise PresetError(f"unknown override section in {key!r}; use model.<field> or train.<field>")
        if section != "model" and name in train_fields:
            train_values[name] = _coerce(value, getattr(preset.train, name), key)
        elif section != "train" and name in model_fields:
            default = model.get(name, getattr(config_from_dict(preset.arch, {}), name))
            model[name] = _coerce(value, default, key)
        else:
            raise PresetError(
                f"unknown setting {key!r}; train fields: {', '.join(train_fields)}; "
                f"{preset.arch} fields: {', '.join(sorted(model_fields))}"
            )
    try:
        config_from_dict(preset.arch, model)
    except (TypeError, ValueError) as exc:
        raise PresetError(f"preset {preset.name}: {exc}") from None
    return replace(preset, model=model, train=replace(preset.train, **train_values))


def parse_set_options(items: list[str]) -> dict[str, str]:
    """``--set key=value`` strings into an overrides dict."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PresetError(f"--set expects KEY=VALUE, got {item!r}")
        result[key.strip()] = value.strip()
    return result
