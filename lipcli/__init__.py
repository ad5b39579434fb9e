"""lipcli: train transformers with enforced Lipschitz bounds, then certify, attack and profile them."""

import torch

from . import checkpoint
from .certification import certify
from .training import train


def load(path: str, device: str = "cpu") -> torch.nn.Module:
    """The model stored in a lipcli checkpoint, in eval mode and ready to run (``checkpoint.load`` has the rest)."""
    return checkpoint.load(path, device=device).model


__all__ = ["certify", "load", "train"]
