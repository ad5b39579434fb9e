"""Training tasks: what a model reads and predicts, as batches for each step and for evaluation.

One task per input kind a model class declares (``input_kind`` in lipcli.models): token streams
(text or token shards), generated associative-recall sequences, or flattened images. Each rank draws
its own slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from . import distributed, recall
from .data import (
    BatchSampler,
    DataError,
    load_shard_splits,
    load_text_splits,
    to_device,
    val_batches,
)
from .distributed import SINGLE, World
from .images import load_image_splits
from .models import IMAGES, model_class
from .presets import Preset, TrainConfig
from .recall import RecallSpec


class _LMTask:
    """Next-token prediction on a token stream."""

    def __init__(self, t: TrainConfig, context: int, world: World = SINGLE) -> None:
        if t.data and t.data.endswith(".bin") or (t.val_data and t.val_data.endswith(".bin")):
            if not t.val_data:
                raise DataError("token-shard training needs train.val_data (a glob of validation shards)")
            self.splits = load_shard_splits(t.data, t.val_data)
        else:
            self.splits = load_text_splits(t.data, tokenizer=t.tokenizer, val_fraction=t.val_fraction, context=context)
        self.vocab_size = self.splits.tokenizer.vocab_size if self.splits.tokenizer else 50257
        per_rank = distributed.local_batch_size(t.batch_size, world)
        self.sampler = BatchSampler(self.splits.train, context, per_rank, t.seed, world.rank, world.size)
        self.context, self.t, self.world = context, t, world

    def model_fields(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size}

    def batch(self, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.sampler.batch(step, device)

    def eval_batches(self, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of the validation batches: every world.size-th one."""
        batches = val_batches(self.splits.val, self.context, self.t.batch_size, self.t.eval_batches)
        for x, y in islice(batches, self.world.rank, None, self.world.size):
            yield x.to(device), y.to(device)

    def tokens_per_batch(self) -> int:
        """Tokens in one global batch (all ranks together)."""
        return self.t.batch_size * self.context

    def tokenizer_dict(self) -> dict | None:
        return self.splits.tokenizer.to_dict() if self.splits.tokenizer else None


class _RecallTask:
    """Multi-query associative recall (lipcli/recall.py): fresh sequences every step, labels at answers only."""

    def __init__(self, t: TrainConfig, context: int, world: World = SINGLE) -> None:
        self.spec = RecallSpec.from_config(t, context)
        self.per_rank = distributed.local_batch_size(t.batch_size, world)
        self.t, self.world = t, world

    def model_fields(self) -> dict[str, Any]:
        return {"vocab_size": self.spec.vocab_size}

    def batch(self, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        x, y = recall.train_batch(self.spec, self.t.seed, step, self.per_rank, self.world.rank, self.world.size)
        return to_device(x, device), to_device(y, device)

    def eval_batches(self, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of the fixed validation set: every world.size-th batch."""
        batches = recall.validation_batches(self.spec, self.t.batch_size, self.t.eval_batches)
        for x, y in islice(batches, self.world.rank, None, self.world.size):
            yield x.to(device), y.to(device)

    def tokens_per_batch(self) -> int:
        return self.t.batch_size * self.spec.length

    def tokenizer_dict(self) -> None:
        return None


class _ImageTask:
    """Classification of flattened images."""

    def __init__(self, t: TrainConfig, world: World = SINGLE) -> None:
        self.per_rank = distributed.local_batch_size(t.batch_size, world)
        self.splits = load_image_splits(t.data, seed=t.seed)
        self.t, self.world = t, world

    def model_fields(self) -> dict[str, Any]:
        return {"input_dim": self.splits.input_dim, "num_classes": self.splits.num_classes}

    def batch(self, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """This rank's slice of the global batch for ``step``."""
        gen = torch.Generator().manual_seed(self.t.seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.splits.y_train), (self.t.batch_size,), generator=gen)
        mine = idx[self.world.rank * self.per_rank : (self.world.rank + 1) * self.per_rank]
        return to_device(self.splits.x_train[mine], device), to_device(self.splits.y_train[mine], device)

    def eval_batches(self, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of the validation set: every world.size-th chunk of 1024."""
        for start in range(1024 * self.world.rank, len(self.splits.y_val), 1024 * self.world.size):
            yield self.splits.x_val[start : start + 1024].to(device), self.splits.y_val[start : start + 1024].to(device)

    def tokens_per_batch(self) -> int:
        return self.t.batch_size

    def tokenizer_dict(self) -> None:
        return None


Task = _LMTask | _RecallTask | _ImageTask


def make_task(preset: Preset, world: World = SINGLE) -> Task:
    """The task feeding ``preset``'s model, chosen by the input kind its model class declares."""
    if model_class(preset.arch).input_kind == IMAGES:
        return _ImageTask(preset.train, world)
    context = int(preset.model.get("context", 256))
    if recall.is_recall(preset.train.data):
        return _RecallTask(preset.train, context, world)
    return _LMTask(preset.train, context, world)
