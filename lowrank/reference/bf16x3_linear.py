"""Reference fp32 linear through bf16 halves ("bf16x3").

    v_hi = bf16(v)  (round to nearest even),   v_lo = bf16(v - v_hi)   (0 where v - v_hi is not finite)
    y = x_hi · W_hiᵀ + x_hi · W_loᵀ + x_lo · W_hiᵀ + bias          (then GELU(y) for activation "gelu", or
                                                                  silu(y_gate) · y_up for "swiglu")

Shapes: x [..., in], weight [out, in], bias [out] or None, all float32; y [..., out] float32. Every product of two
bf16 numbers is exact in fp32, so the kernels differ from this reference only in the order of their fp32 sums.
Against the exact x·Wᵀ each product is off by at most ~2⁻¹⁷ relative (x_lo and W_lo keep 16 of fp32's 24
significand bits, and x_lo·W_lo is dropped): the result matches fp32 F.linear to ~1e-5 relative, not bit for bit.
The halves are computed in fp32 and the three products are fp32 matmuls of exactly representable values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bf16_halves(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_hi, v_lo) as float32 tensors holding bf16 values, v_hi + v_lo ≈ v to 2⁻¹⁸ relative."""
    hi = round_to_bf16(v)
    d = v - hi
    lo = round_to_bf16(torch.where(torch.isfinite(d), d, torch.zeros_like(d)))
    return hi, lo


def round_to_bf16(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to the nearest bfloat16 (ties to even), in v's dtype: ``v.to(bfloat16).to(v.dtype)``.

    Written on the bit pattern because torch.compile (Inductor) folds a cast down and back up into a no-op, which
    would turn the halves into (v, 0) and the op into a plain fp32 linear under compile. Adding 0x7FFF plus the
    kept part's lowest bit and clearing the low 16 bits is round-to-nearest-even on the magnitude; NaN is passed
    through (the carry would run into its sign bit), and finite values past bfloat16's largest round to ±inf, as
    the cast does.
    """
    if v.dtype != torch.float32:  # e.g. the float64 oracle of the tests: no compile path, the cast is exact
        return v.to(torch.bfloat16).to(v.dtype)
    bits = v.view(torch.int32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) & -65536).view(torch.float32)
    return torch.where(torch.isnan(v), v, rounded)


def bf16x3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str = "none") -> torch.Tensor:
    """The specification of ``lowrank.ops.bf16x3_linear``; differentiable by torch's own autograd.

    ``activation="gelu"`` applies the exact (erf) GELU to the result, as ``F.gelu`` does. ``activation="swiglu"``
    takes weight = [gate; up] ([2H, in]) and bias [2H], and returns ``F.silu(y[..., :H]) * y[..., H:]`` ([..., H]).
    """
    x_hi, x_lo = bf16_halves(x)
    w_hi, w_lo = bf16_halves(weight)
    y = F.linear(x_hi, w_hi, bias) + F.linear(x_hi, w_lo) + F.linear(x_lo, w_hi)
    return activate(y, activation)


def activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The epilogue of bf16x3_linear on the fp32 product y (with bias)."""
    if activation == "gelu":
        return F.gelu(y)
    if activation == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y
