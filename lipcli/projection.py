"""Projecting trained weights onto the constraint set after the fact: the step that makes any weights certifiable.

Training constrains after every step (lipcli.optim); this applies one constraint method once, to a whole
model, as ``lipcli convert --project`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from .constraints import METHODS, CapContext, project
from .nn import Embedding, HeadLinear, Linear
from .optim import cap_embedding_rows

# The methods that leave every singular value <= sigma_max, the only ones a projection can use.
ENFORCING = tuple(name for name, method in METHODS.items() if method.enforces)


@torch.no_grad()
def project_model(model: nn.Module, method: str, sigma_max: float) -> None:
    """Project every weight matrix onto sigma_max with ``method``; cap embedding rows at unit RMS."""
    for module in model.modules():
        if isinstance(module, Embedding):
            module.weight.copy_(cap_embedding_rows(module.weight))
        elif isinstance(module, (Linear, HeadLinear)):
            module.weight.copy_(project(module.weight, method, CapContext(sigma_max)))
