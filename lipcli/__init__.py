"""lipcli: train transformers with enforced Lipschitz bounds, then certify, attack and profile them."""

from .certification import certify_model as certify
from .checkpoint import load
from .training import train

__all__ = ["certify", "load", "train"]
