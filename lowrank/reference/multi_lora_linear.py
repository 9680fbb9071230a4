"""Reference multi-adapter LoRA linear (SGMV / BGMV semantics).

    y_t = x_t·Wᵀ + b + s[i_t]·(x_t·A[i_t, :r_i]ᵀ)·B[i_t, :, :r_i]ᵀ     for every token t with i_t = adapter_ids[t] ≥ 0
    y_t = x_t·Wᵀ + b                                                   for tokens with i_t = -1 (no adapter)

Shapes: x [..., in] (leading dims flattened into T tokens), weight W [out, in], bias b [out] or None,
lora_a A [n, r, in], lora_b B [n, out, r], adapter_ids [T] (any integer dtype; ``x.shape[:-1]`` flattened),
scaling s [n] (tensor or sequence of floats), ranks [n] or None (true rank r_i ≤ r of each adapter; the storage
is padded to r, and the padding takes no part in the result or the gradients).

Computed in the inputs' dtype exactly as PEFT's mixed-batch forward (``adapter_names=``) does it: the base layer,
then for each adapter the rows ``x[idx]`` through ``lora_A`` / ``lora_B`` scaled and added to ``result[idx]``.
Differentiable by torch's own autograd; not traceable by torch.compile (data-dependent row selection).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, adapter_ids: torch.Tensor, scaling: torch.Tensor | Sequence[float],
                      ranks: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Unfused multi-adapter LoRA: a per-adapter loop over the tokens that use it (PEFT's algorithm)."""
    out_features, in_features = weight.shape
    n, r = lora_a.shape[0], lora_a.shape[1]
    y = F.linear(x, weight, bias)
    x2 = x.reshape(-1, in_features)
    y2 = y.reshape(-1, out_features)
    ids = adapter_ids.reshape(-1)
    scales = [float(s) for s in (scaling.tolist() if isinstance(scaling, torch.Tensor) else scaling)]
    if ranks is None:
        true_ranks = [r] * n
    else:
        true_ranks = [int(k) for k in (ranks.tolist() if isinstance(ranks, torch.Tensor) else ranks)]
    for a in range(n):
        # No skip for adapters without tokens or of rank 0: their (empty) products keep every factor in the
        # autograd graph, so their gradients come out as zeros rather than None.
        idx = (ids == a).nonzero().squeeze(1)
        k = true_ranks[a]
        h = F.linear(x2[idx], lora_a[a, :k])
        y2 = y2.index_add(0, idx, F.linear(h, lora_b[a, :, :k]) * scales[a])
    return y2.reshape(y.shape)
