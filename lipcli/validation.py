"""Validation batches for a trained model: the one place that knows where a checkpoint's held-out data lives.

Keyed on the model's declared ``input_kind`` ("tokens" or "images", a class attribute in lipcli.models), so
activations, attack and convert draw the same batches without asking which architecture they hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import Tensor, nn

from .data import DataError
from .images import load_image_splits
from .models import IMAGES
from .recall import recorded_val_batches

Batch = tuple[Tensor, Tensor]


class Trained(Protocol):
    """What a checkpoint (or a conversion's source) knows about the run that made its weights."""

    model: nn.Module
    model_config: dict
    train_config: dict
    tokenizer: dict | None


def checkpoint_batches(
    trained: Trained, data: str | None, batch_size: int, max_batches: int
) -> tuple[list[Batch], str]:
    """The first ``max_batches`` validation batches of the data ``trained`` was fit on (or of ``data``), and their
    source in words."""
    tc = trained.train_config
    if trained.model.input_kind == IMAGES:
        return image_batches(tc, data, batch_size, max_batches)
    batches, source = recorded_val_batches(tc, trained.model_config, trained.tokenizer, data, batch_size, max_batches)
    vocab = int(trained.model_config["vocab_size"])
    top = max((int(x.max()) for x, _ in batches), default=-1)
    if top >= vocab:  # data tokenized without the checkpoint's tokenizer may reach past the embedding
        raise DataError(f"{source}: its vocabulary reaches token {top}, larger than the model's ({vocab})")
    return batches, source


def image_batches(
    train_config: Mapping[str, Any], data: str | None, batch_size: int, max_batches: int
) -> tuple[list[Batch], str]:
    """The first validation images of the checkpoint's image set (or ``data``), ``batch_size`` per batch."""
    name = data or train_config.get("data")
    if not name:
        raise DataError("the checkpoint does not name its image set; pass --data digits or --data cifar10")
    images = load_image_splits(name, seed=train_config.get("seed", 0))
    pairs = zip(images.x_val.split(batch_size), images.y_val.split(batch_size), strict=True)
    return list(pairs)[:max_batches], images.source
