"""Reference fused LoRA linear.

    y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ

Shapes: x [..., in], weight W [out, in], bias b [out] or None, lora_a A [r, in], lora_b B [out, r], scaling s
(PEFT's alpha / r). Computed in the inputs' dtype with stock torch ops, exactly as an unfused LoRA layer
(PEFT's ``lora.Linear``) does; differentiable by torch's own autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Unfused LoRA linear: ``F.linear(x, W, b) + scaling * F.linear(F.linear(x, A), B)``."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)
