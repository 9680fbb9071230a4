"""Reference mixture of rank-1 experts LoRA (MoRA / SMoRA): the specification of ``rank1_experts_lora``.

Each of the E ranks of a LoRA is an expert; token t activates the k experts topk(t):

    y_t = x_t·Wᵀ + b + s · Σ_{e ∈ topk(t)} g_te · h_te · b_e,        h_te = a_e·x_t

Shapes: x [..., in] (T tokens over the leading dims), weight W [out, in], bias b [out] or None, lora_a [E, in]
(row a_e), lora_b [out, E] (column b_e), router [E, in], router_bias [E]. Outputs: y [..., out] in x's dtype,
indices [..., k] int64 and gates [..., k] (float32; float64 for float64 inputs).

Gates (the gating math runs in float32 — float64 for float64 inputs — whatever x's dtype, so that every backend
selects the same experts from the same inputs; the expand then runs in x's dtype as an unfused layer does):
  * "router" (SMoRA): scores p = σ(x·routerᵀ); selection by p + router_bias (the non-trainable per-expert bias of
    auxiliary-loss-free balancing: it moves selection only); gates g = p_sel / Σ p_sel (no bias).
  * "self" (MoRA): scores n = h / max(‖h‖₂, eps) over the E ranks; selection by n; gates
    g = softmax(n_sel / temperature) over the k selected (a masked softmax).
  * threshold (either gate, meant for inference): gates below it are set to 0 (not renormalised): pruned ranks.

Selection (deterministic, identical on every backend): experts ordered by descending selection score, equal
scores broken by the lower expert index; indices[t] lists the k first in that order (a stable descending sort).
Scores that are NaN give an unspecified selection.

Gradients (straight-through over the discrete selection): the selection is piecewise constant and gets no
gradient; gradients flow to x, to the selected experts' a_e and b_e, to the router through the gate values (the
σ scores of the selected experts) and to the returned gates. Under "self" the L2 norm couples all ranks, so every
a_e gets a (small) gradient through the normalisation; under "router" only selected experts' a_e, b_e do.
router_bias never gets a gradient. Pruned (thresholded) gates are constants 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rank1_experts_lora", "rank1_experts_lora_dense", "select_topk", "NORM_EPS"]

NORM_EPS = 1e-12   # floor of ‖h‖₂ under "self" gating (F.normalize's default)


def _gate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [T, k] of the k largest ``scores`` [T, E] per row; ties: lower index first (stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def _gates(x2, lora_a, top_k, router, router_bias, gate, temperature, threshold):
    """(h [T, E], indices [T, k], gates [T, k]) in the gate dtype; differentiable through the gate values."""
    gd = _gate_dtype(x2)
    xg = x2.to(gd)
    h = xg @ lora_a.to(gd).t()
    if gate == "router":
        p = torch.sigmoid(xg @ router.to(gd).t())
        sel = p.detach() if router_bias is None else p.detach() + router_bias.detach().to(gd)
        idx = select_topk(sel, top_k)
        ps = p.gather(1, idx)
        g = ps / ps.sum(-1, keepdim=True)
    elif gate == "self":
        n = h / h.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        idx = select_topk(n.detach(), top_k)
        g = torch.softmax(n.gather(1, idx) / temperature, dim=-1)
    else:
        raise ValueError(f"rank1_experts_lora: gate must be 'router' or 'self', got {gate!r}")
    if threshold is not None:
        g = g.masked_fill(g.detach() < threshold, 0.0)
    return h, idx, g


def rank1_experts_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, top_k: int, *, scaling: float = 1.0,
                       router: torch.Tensor | None = None, router_bias: torch.Tensor | None = None,
                       gate: str = "router", temperature: float = 1.0, threshold: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The oracle: (y [..., out], indices [..., k] int64, gates [..., k]); see the module docstring.

    The gated activations u = s·g·h_sel are scattered into a [T, E] matrix (zero for unselected experts) and
    expanded in x's dtype, ``y = F.linear(x, W, b) + u·Bᵀ``; differentiable by torch's autograd.
    """
    lead, in_ = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, in_)
    h, idx, g = _gates(x2, lora_a, top_k, router, router_bias, gate, temperature, threshold)
    u = torch.zeros_like(h).scatter(1, idx, scaling * g * h.gather(1, idx))
    y = F.linear(x2, weight, bias) + F.linear(u.to(x.dtype), lora_b)
    return y.reshape(*lead, weight.shape[0]), idx.reshape(*lead, top_k), g.reshape(*lead, top_k)


def rank1_experts_lora_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             lora_a: torch.Tensor, lora_b: torch.Tensor, top_k: int, *, scaling: float = 1.0,
                             router: torch.Tensor | None = None, router_bias: torch.Tensor | None = None,
                             gate: str = "router", temperature: float = 1.0, threshold: float | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense masked implementation as the papers' code writes it: the benchmark peer, not the oracle.

    Everything in x's dtype: all E rank activations h = x·Aᵀ, the router scores, ``torch.topk`` (ties in
    whatever order it returns them), a dense [T, E] gate mask, then ``(h ⊙ mask)·Bᵀ`` over all E ranks.
    """
    lead, in_ = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, in_)
    h = F.linear(x2, lora_a)
    if gate == "router":
        p = torch.sigmoid(F.linear(x2, router))
        sel = p.detach() if router_bias is None else p.detach() + router_bias.to(p.dtype)
        idx = torch.topk(sel, top_k, dim=-1).indices
        ps = p.gather(1, idx)
        g = ps / ps.sum(-1, keepdim=True)
    else:
        n = F.normalize(h, dim=-1, eps=NORM_EPS)
        idx = torch.topk(n.detach(), top_k, dim=-1).indices
        g = torch.softmax(n.gather(1, idx) / temperature, dim=-1)
    if threshold is not None:
        g = g * (g >= threshold)
    mask = torch.zeros_like(h).scatter(1, idx, g)
    y = F.linear(x2, weight, bias) + F.linear(h * mask * scaling, lora_b)
    return y.reshape(*lead, weight.shape[0]), idx.reshape(*lead, top_k), g.reshape(*lead, top_k)
