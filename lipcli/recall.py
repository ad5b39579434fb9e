"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), generated in-process from a seed.

A sequence lists ``pairs`` key-value pairs (keys from ``[0, keys)``, values from ``[keys, keys + values)``,
both drawn without replacement), then asks for ``queries`` distinct ones of its keys, each query key
followed by its value (teacher-forced). Only the positions that read a query key carry a label, the value
paired with it; every other label is :data:`IGNORE_INDEX`, so loss and accuracy count answers alone.
Answering needs a lookup by content: a model that mixes tokens by position only stays near chance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .data import DataError, recorded_val_tokens, val_batches

RECALL_DATA = "recall"
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
# Validation sequences come in fixed blocks, so the first n are the same whatever the count asked for.
_VAL_BLOCK = 64

Batch = tuple[Tensor, Tensor]


def is_recall(data: str | None) -> bool:
    return data == RECALL_DATA


@dataclass(frozen=True)
class RecallSpec:
    """The task's sizes: key and value vocabularies, pairs listed, and queries asked per sequence."""

    keys: int
    values: int
    pairs: int
    queries: int

    @classmethod
    def from_config(cls, train_config: Any, context: int) -> RecallSpec:
        """The spec in a TrainConfig or a checkpoint's train_config dict; a bad one raises a one-line DataError."""
        get = train_config.get if isinstance(train_config, Mapping) else lambda key: getattr(train_config, key)
        spec = cls(get("recall_keys"), get("recall_values"), get("recall_pairs"), get("recall_queries"))
        spec.check(context)
        return spec

    @property
    def vocab_size(self) -> int:
        return self.keys + self.values

    @property
    def length(self) -> int:
        """Tokens per sequence: every pair, then every query with its answer."""
        return 2 * (self.pairs + self.queries)

    @property
    def chance(self) -> float:
        """The best accuracy without recall: guess a listed value not yet answered (the j-th query has pairs - j left).

        Counting bags of tokens is enough for that, so a model that mixes by position alone can reach it.
        """
        return sum(1.0 / (self.pairs - j) for j in range(self.queries)) / self.queries

    def check(self, context: int) -> None:
        for name in ("keys", "values", "pairs", "queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DataError(f"train.recall_{name} must be an integer >= 1 (got {value!r})")
        if self.pairs > min(self.keys, self.values):
            raise DataError(
                f"train.recall_pairs {self.pairs} needs as many distinct keys and values "
                f"(recall_keys {self.keys}, recall_values {self.values}): lower recall_pairs"
            )
        if self.queries > self.pairs:
            raise DataError(f"train.recall_queries {self.queries} must be <= recall_pairs {self.pairs}")
        if self.length > context:
            raise DataError(
                f"a recall sequence has 2 (pairs + queries) = {self.length} tokens, more than model.context "
                f"{context}: raise model.context or lower recall_pairs/recall_queries"
            )


def _seed(*parts: object) -> int:
    # A stable hash (unlike hash()), so a (seed, step) batch is the same in every run and resume.
    text = ":".join(str(p) for p in ("recall", *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _draw(n: int, population: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct integers from ``[0, population)`` per row, in random order: [n, k]."""
    return torch.rand(n, population, generator=generator).argsort(dim=1)[:, :k]


def generate(spec: RecallSpec, n: int, generator: torch.Generator) -> Batch:
    """``n`` sequences ``x`` [n, length] and their labels ``y`` (the value after each query key, ignored elsewhere)."""
    keys = _draw(n, spec.keys, spec.pairs, generator)
    values = _draw(n, spec.values, spec.pairs, generator) + spec.keys
    asked = _draw(n, spec.pairs, spec.queries, generator)
    x = torch.empty(n, spec.length, dtype=torch.int64)
    end = 2 * spec.pairs
    x[:, 0:end:2], x[:, 1:end:2] = keys, values
    x[:, end::2], x[:, end + 1 :: 2] = keys.gather(1, asked), values.gather(1, asked)
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, end::2] = x[:, end + 1 :: 2]
    return x, y


def train_batch(spec: RecallSpec, seed: int, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
    """This rank's slice of the global batch for ``step``: a pure function of (seed, step, rank)."""
    generator = torch.Generator().manual_seed(_seed("train", seed, step))
    x, y = generate(spec, batch_size * world_size, generator)
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    return x[mine], y[mine]


def validation_set(spec: RecallSpec, n: int) -> Batch:
    """The first ``n`` sequences of the fixed validation set: a seed of its own, the same for every run."""
    blocks = [
        generate(spec, _VAL_BLOCK, torch.Generator().manual_seed(_seed("val", block)))
        for block in range(-(-n // _VAL_BLOCK))
    ]
    x, y = (torch.cat(parts)[:n] for parts in zip(*blocks, strict=True))
    return x, y


def validation_batches(spec: RecallSpec, batch_size: int, max_batches: int) -> Iterator[Batch]:
    """``max_batches`` batches of ``batch_size`` validation sequences."""
    if batch_size < 1 or max_batches < 1:
        raise DataError(
            f"batch size and the number of eval batches must be positive, got {batch_size} and {max_batches}"
        )
    x, y = validation_set(spec, batch_size * max_batches)
    return zip(x.split(batch_size), y.split(batch_size), strict=True)


def recorded_val_batches(
    train_config: Mapping[str, Any],
    model_config: Mapping[str, Any],
    tokenizer: dict[str, Any] | None,
    data: str | None,
    batch_size: int,
    max_batches: int,
) -> tuple[list[Batch], str]:
    """A checkpoint's first validation batches (inputs, labels) for recall or token data, and their source.

    ``data`` replaces the checkpoint's training data; recall labels are ignored except at answer positions.
    """
    context = int(model_config["context"])
    if is_recall(data or train_config.get("data")):
        spec = RecallSpec.from_config(train_config, context)
        if spec.vocab_size > int(model_config["vocab_size"]):
            raise DataError(
                f"recall needs {spec.vocab_size} tokens (keys + values), the model has {model_config['vocab_size']}: "
                "evaluate a recall checkpoint on the data it was trained on"
            )
        batches = list(validation_batches(spec, batch_size, max_batches))
        source = (
            f"recall (MQAR) validation set: {spec.pairs} pairs, {spec.queries} queries, "
            f"{spec.keys} keys, {spec.values} values"
        )
        return batches, source
    tokens, source = recorded_val_tokens(dict(train_config), tokenizer, context, data)
    return list(val_batches(tokens, context, batch_size, max_batches)), source
