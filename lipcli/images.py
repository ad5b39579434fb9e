"""Small image sets for the image models: sklearn's digits offline, CIFAR-10 from the Hugging Face hub.

Images are flattened to [0, 1] float32 rows with int64 labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data import DataError, check_val_fraction, error_summary

CIFAR10_HUB_ID = "uoft-cs/cifar10"
IMAGE_DATASETS = ("cifar10", "digits")


@dataclass
class ImageSplits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    input_dim: int
    source: str


def _digits(val_fraction: float, seed: int) -> ImageSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, digits.target, test_size=val_fraction, random_state=seed, stratify=digits.target
    )
    return ImageSplits(
        x_train=torch.from_numpy(x_tr),
        y_train=torch.from_numpy(y_tr).long(),
        x_val=torch.from_numpy(x_va),
        y_val=torch.from_numpy(y_va).long(),
        num_classes=10,
        input_dim=x.shape[1],
        source=f"sklearn digits ({len(x)} 8x8 images, stratified split seed {seed})",
    )


def _image_array(img: Any) -> np.ndarray:
    # The hub gives PIL images; in-process datasets may hold nested lists or arrays instead.
    if hasattr(img, "convert"):
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).reshape(-1)


def _cifar_split(split: Any) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = np.stack([_image_array(img) for img in split["img"]])
    if pixels.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 images have {pixels.shape[1]} values, expected 3072 (32x32 RGB)")
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    return x, torch.as_tensor(np.asarray(split["label"]), dtype=torch.int64)


def _cifar10() -> ImageSplits:
    import datasets  # imported lazily: it is slow and only needed for CIFAR-10

    try:
        splits = datasets.load_dataset(CIFAR10_HUB_ID)
    except Exception as exc:
        raise DataError(
            f"CIFAR-10 needs the Hugging Face hub or a local datasets cache ({error_summary(exc)}); "
            "try mlp-digits to train offline"
        ) from exc
    x_tr, y_tr = _cifar_split(splits["train"])
    x_va, y_va = _cifar_split(splits["test"])
    return ImageSplits(x_tr, y_tr, x_va, y_va, 10, x_tr.shape[1], f"hub:{CIFAR10_HUB_ID} train/test")


def load_image_splits(name: str, val_fraction: float = 0.2, seed: int = 0) -> ImageSplits:
    """Flattened [0, 1] float32 images with int64 labels; CIFAR-10 keeps its own train/test split."""
    if name == "digits":
        check_val_fraction(val_fraction)
        return _digits(val_fraction, seed)
    if name == "cifar10":
        return _cifar10()
    raise DataError(f"unknown image dataset {name!r}; known: {', '.join(IMAGE_DATASETS)}")
