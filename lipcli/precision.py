"""Storage precisions of converted weights: the dtype names, and fp8 with a per-tensor scale.

fp8 (``float8_e4m3fn``) stores ``w / scale`` with ``scale = max|w| / 448`` per tensor; the scales travel in
the file's ``fp8_scales`` metadata and files holding them are marked ``format = "lipcli-fp8"``, which
``checkpoint.load`` refuses (it would read the scaled values as the weights).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8-e4m3": torch.float8_e4m3fn}
FP8 = "fp8-e4m3"
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_FORMAT = "lipcli-fp8"


def dtype_name(tensors: dict[str, Tensor]) -> str:
    """The single storage dtype of the float tensors, or fp32 when they are mixed."""
    found = {t.dtype for t in tensors.values() if t.is_floating_point()}
    names = [name for name, dtype in DTYPES.items() if {dtype} == found]
    return names[0] if names else "fp32"


def quantize_fp8(tensor: Tensor) -> tuple[Tensor, float]:
    """``(tensor / scale)`` as float8_e4m3fn and ``scale = max|tensor| / 448`` (1 for an all-zero tensor)."""
    wide = tensor.detach().double()
    peak = float(wide.abs().max())
    scale = peak / FP8_MAX if peak > 0 else 1.0
    # Rounding in the division can land a hair above 448; e4m3fn has no inf to absorb it.
    return (wide / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(tensor: Tensor, scale: float) -> Tensor:
    return (tensor.double() * scale).float()


def stored_tensors(model: nn.Module, dtype: str) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The tensors to write in ``dtype`` and, for fp8, their scales; ``model`` then holds exactly those values."""
    tensors, scales = {}, {}
    for name, t in model.state_dict().items():
        if dtype == FP8:
            tensors[name], scales[name] = quantize_fp8(t)
        else:
            tensors[name] = t.detach().to(DTYPES[dtype]).contiguous()
    stored = {n: dequantize_fp8(t, scales[n]) if n in scales else t.float() for n, t in tensors.items()}
    model.load_state_dict(stored, strict=True)
    return tensors, scales
