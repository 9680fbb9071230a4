"""Reference query-row attention mass.

For queries q [B, Hq, nq, d] sitting at positions offset .. offset+nq-1 of a causal sequence whose keys are
k [B, Hkv, n, d] (positions 0..n-1; grouped-query attention: query head h reads key head h // (Hq / Hkv)):

    p[b, h, i, j] = softmax_j( scale · q[b,h,i] · k[b, h//g, j] )   over j <= offset + i (causal)
    mass[b, h, j] = sum_i p[b, h, i, j]                               [B, Hq, n], float32 (float64 for fp64 input)

i.e. the column sums of the query rows of the attention matrix that ``output_attentions=True`` would return,
without forming the other n - nq rows. Computed here the plain way (scores, masked softmax, sum) in fp32.
"""
from __future__ import annotations

import torch


def query_attention_mass(q: torch.Tensor, k: torch.Tensor, scale: float, offset: int) -> torch.Tensor:
    """Column sums over the query rows of causal softmax(scale·q·kᵀ); float32 (float64 for fp64) [B, Hq, n]."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, nq, d = q.shape
    n = k.shape[2]
    group = Hq // k.shape[1]
    kk = k.to(acc).repeat_interleave(group, dim=1)                      # [B, Hq, n, d]
    scores = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale      # [B, Hq, nq, n]
    pos = offset + torch.arange(nq, device=q.device)
    allowed = torch.arange(n, device=q.device)[None, :] <= pos[:, None]  # [nq, n]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).sum(dim=2)
