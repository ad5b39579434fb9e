"""Named presets (``models/*.toml``, installed as ``lipcli.model_presets``) and command-line overrides."""

from __future__ import annotations

import json
import math
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
    adamw_lr: float | None = None  # muon-adamw: AdamW's lr on the embedding, head and gains (None: lr)
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
    # lipcli/anneal.py: fixed scales (e.g. softmax_scale, final_scale) to start from, moved linearly to the
    # model's own values between these steps; the model's values are what the checkpoint holds and certify bounds.
    anneal_from: dict[str, float] = field(default_factory=dict)
    anneal_start: int = 0
    anneal_end: int = 0
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
    baselines: tuple[str, ...] = ()  # the unconstrained references a sweep compares this preset against


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
    baselines = raw.get("baselines", [])
    if not isinstance(baselines, list) or not all(isinstance(b, str) for b in baselines):
        raise PresetError(f"preset {name}: baselines must be a list of preset names")
    preset = Preset(name, raw.get("description", ""), arch, model, TrainConfig(), tuple(baselines))
    return apply_overrides(preset, {f"train.{k}": v for k, v in raw.get("train", {}).items()})


@dataclass(frozen=True)
class Rule:
    """What one [train] value must be: its type, for numbers a finite range, for names a set of choices."""

    kind: type  # str, int, float, bool or dict (a table of finite numbers keyed by group name)
    optional: bool = False  # None is allowed
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        bounds = [
            f"{op} {limit:g}" for op, limit in ((">", self.gt), (">=", self.ge), ("<", self.lt)) if limit is not None
        ]
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        else:
            noun = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false",
                    dict: "a table of finite numbers"}[self.kind]  # fmt: skip
            text = " ".join([noun, " and ".join(bounds)]).strip()
        return text + (" (or unset)" if self.optional else "")

    def check(self, key: str, value: Any) -> Any:
        """``value`` in the field's type (an int becomes a float where a float is due), or PresetError."""
        if value is None and self.optional:
            return None
        if self.kind is dict:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise self._error(key, value)
            return {name: replace(self, kind=float).check(f"{key}.{name}", v) for name, v in value.items()}
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # bool is an int to Python, never to a config file.
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            raise self._error(key, value)
        if self.kind is float and not math.isfinite(value):
            raise self._error(key, value)
        if self.choices and value not in self.choices:
            raise self._error(key, value)
        if self.kind in (int, float) and not self._in_range(value):
            raise self._error(key, value)
        return value

    def _in_range(self, value: float) -> bool:
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
        )

    def _error(self, key: str, value: Any) -> PresetError:
        return PresetError(f"{key} must be {self.describe()} (got {value!r})")


# One rule per TrainConfig field (tests check they match); optimizer, method, tokenizer, data and device
# are names their own modules check, with the list of choices.
TRAIN_RULES: dict[str, Rule] = {
    "data": Rule(str, optional=True),
    "val_data": Rule(str, optional=True),
    "tokenizer": Rule(str),
    "val_fraction": Rule(float, gt=0, lt=1),
    "optimizer": Rule(str),
    "method": Rule(str),
    "sigma_max": Rule(float, gt=0),
    "caps": Rule(dict, gt=0),
    "lr_mult": Rule(dict, ge=0),
    "embed_inflation": Rule(float, ge=1),
    "blocks_mass": Rule(float, optional=True, gt=0),
    "lr": Rule(float, gt=0),
    "adamw_lr": Rule(float, optional=True, gt=0),
    "wd": Rule(float, ge=0),
    "steps": Rule(int, ge=1),
    "batch_size": Rule(int, ge=1),
    "warmup": Rule(int, ge=0),
    "schedule": Rule(str, choices=("linear", "cosine", "constant")),
    "eval_every": Rule(int, ge=1),
    "eval_batches": Rule(int, ge=1),
    "seed": Rule(int, ge=0, lt=2**32),
    "device": Rule(str),
    "dtype": Rule(str, choices=("fp32", "bf16")),
    "compile": Rule(bool),
    "anneal_from": Rule(dict),
    "anneal_start": Rule(int, ge=0),
    "anneal_end": Rule(int, ge=0),
    # Recall sizes: lipcli.recall.RecallSpec checks how they fit together (pairs <= keys, context) by name.
    "recall_keys": Rule(int, ge=1),
    "recall_values": Rule(int, ge=1),
    "recall_pairs": Rule(int, ge=1),
    "recall_queries": Rule(int, ge=1),
}


def check_train_config(t: TrainConfig) -> TrainConfig:
    """``t`` with every field checked against TRAIN_RULES (type, finiteness, range); PresetError names the field."""
    return replace(t, **{f.name: TRAIN_RULES[f.name].check(f"train.{f.name}", getattr(t, f.name)) for f in fields(t)})


def _coerce(value: Any, current: Any, key: str, rule: Rule | None = None) -> Any:
    """Parse a command-line string into the type of the field it overrides."""
    if not isinstance(value, str) or isinstance(current, str) or (rule is not None and rule.kind is str):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value if current is None and rule is None else _fail(key, value)
    if isinstance(current, bool) and not isinstance(parsed, bool):
        _fail(key, value)
    if isinstance(current, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
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
            train_values[name] = _coerce(value, getattr(preset.train, name), key, TRAIN_RULES[name])
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
    return replace(preset, model=model, train=check_train_config(replace(preset.train, **train_values)))


def parse_set_options(items: list[str]) -> dict[str, str]:
    """``--set key=value`` strings into an overrides dict."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PresetError(f"--set expects KEY=VALUE, got {item!r}")
        result[key.strip()] = value.strip()
    return result
