"""Oracle of ``lowrank::onednn_linear``: y = x·Wᵀ + b, the plain ``F.linear`` (its GEMM is the only difference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in]``, ``weight [out, in]``, ``bias [out]`` or None → ``[..., out]``."""
    return F.linear(x, weight, bias)
