"""Reference sparse-plus-low-rank linear (SLTrain, LOST).

    y = x·Aᵀ·Bᵀ + x·Sᵀ + b,          W = B·A + S

Shapes: x [..., in], lora_a A [r, in], lora_b B [out, r], s_values [nnz] (the nonzeros of S in row-major (CSR)
order), s_layout the fixed support (anything with ``shape = (out, in)``, ``row_ptr`` [out + 1] and ``col_idx``
[nnz], e.g. :class:`lowrank.ops.SparseLayout`), bias b [out] or None; y [..., out].

Two plain-PyTorch forms, both differentiable by torch's autograd:

* :func:`sparse_lowrank_linear` is the oracle (the specification): the low-rank path as two skinny products
  and S scattered into a dense [out, in] matrix, computed in the inputs' dtype. Tests compare every kernel
  (forward and all gradients) against it evaluated in float64.
* :func:`sltrain_linear` is SLTrain's algorithm (Han et al., 2024, "SLTrain: a sparse plus low-rank approach
  for parameter and memory efficient pretraining"), the peer in the benchmarks: the forward forms the dense
  W = B·A + S and runs a dense GEMM; the backward forms W again together with the dense weight gradient
  G = gᵀ·x [out, in] and projects it: dB = G·Aᵀ, dA = Bᵀ·G, d s_values = G at the support. That costs a dense
  layer's compute and two dense [out, in] temporaries, which is what lowrank's kernels avoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sparse_lowrank_linear", "sltrain_linear", "flat_indices", "dense_sparse"]


def flat_indices(s_layout) -> torch.Tensor:
    """Row-major flat positions ``row·in + col`` [nnz] int64 of the support (SLTrain's ``sparse_index``)."""
    out, in_ = s_layout.shape
    row_ptr = s_layout.row_ptr.long()
    rows = torch.repeat_interleave(torch.arange(out, device=row_ptr.device), row_ptr.diff())
    return rows * in_ + s_layout.col_idx.long()


def dense_sparse(s_values: torch.Tensor, s_layout) -> torch.Tensor:
    """S as a dense [out, in] tensor (differentiable w.r.t. ``s_values``). For tests and inspection only."""
    out, in_ = s_layout.shape
    flat = flat_indices(s_layout).to(s_values.device)
    return s_values.new_zeros(out * in_).index_add(0, flat, s_values).view(out, in_)


def sparse_lowrank_linear(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, s_values: torch.Tensor,
                          s_layout, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Oracle: ``F.linear(F.linear(x, A), B) + F.linear(x, S_dense, b)``."""
    return F.linear(F.linear(x, lora_a), lora_b) + F.linear(x, dense_sparse(s_values, s_layout), bias)


class _SLTrainLinear(torch.autograd.Function):
    """SLTrain's dense-materializing layer (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, s_values, flat, bias):
        out, in_ = lora_b.shape[0], lora_a.shape[1]
        w = (lora_b @ lora_a).view(-1).index_add_(0, flat, s_values).view(out, in_)
        ctx.save_for_backward(x, lora_a, lora_b, s_values, flat)
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, g):
        x, lora_a, lora_b, s_values, flat = ctx.saved_tensors
        out, in_ = lora_b.shape[0], lora_a.shape[1]
        need = ctx.needs_input_grad
        g2, x2 = g.reshape(-1, out), x.reshape(-1, in_)
        dx = da = db = dv = dbias = None
        if need[0]:
            w = (lora_b @ lora_a).view(-1).index_add_(0, flat, s_values).view(out, in_)   # formed again
            dx = (g2 @ w).view(x.shape)
            del w
        if need[1] or need[2] or need[3]:
            gw = g2.t() @ x2                    # dense weight gradient [out, in]
            if need[1]:
                da = lora_b.t() @ gw
            if need[2]:
                db = gw @ lora_a.t()
            if need[3]:
                dv = gw.view(-1).index_select(0, flat)
        if ctx.has_bias and need[5]:
            dbias = g2.sum(0)
        return dx, da, db, dv, None, dbias


def sltrain_linear(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, s_values: torch.Tensor,
                   s_layout_or_flat, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SLTrain's algorithm: dense W = B·A + S in forward, dense W and Gᵀ·X again in backward.

    ``s_layout_or_flat`` is a layout or SLTrain's int64 ``sparse_index`` (sorted row-major flat positions).
    """
    flat = s_layout_or_flat if isinstance(s_layout_or_flat, torch.Tensor) else flat_indices(s_layout_or_flat)
    return _SLTrainLinear.apply(x, lora_a, lora_b, s_values, flat.to(x.device), bias)
