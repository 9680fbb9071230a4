"""Reference identifier-logit gather.

    logits[t, j] = hidden[t] · weight[ids[j]] + bias[ids[j]]

Shapes: hidden [..., d], weight [V, d] (an LM head, one row per vocabulary entry), ids [k] (int32/int64 indices
into V, repeats allowed), bias [V] or None; logits [..., k]. This is ``(hidden @ weight.T + bias)[..., ids]``, the
full vocabulary projection followed by a column gather, written as the gather of k rows followed by a small
product: the same numbers (each logit is one dot product either way), computed in the inputs' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(hidden, weight[ids], bias[ids])``; differentiable by torch's own autograd."""
    idx = ids.long()
    return F.linear(hidden, weight.index_select(0, idx), None if bias is None else bias.index_select(0, idx))
