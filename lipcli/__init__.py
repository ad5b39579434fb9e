"""lipcli: train transformers with enforced Lipschitz bounds, then certify, attack and profile them."""

from .certification import certify
from .checkpoint import load
from .training import train

__all__ = ["certify", "load", "train"]
