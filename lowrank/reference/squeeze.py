"""Reference LoRA-Squeeze: the truncated SVD of the dense LoRA update, the specification of
``lowrank.compress.squeeze_lora``.

For LoRA factors in PEFT's layout, A = ``lora_a`` ``[..., r, n]`` and B = ``lora_b`` ``[..., m, r]``:

    ΔW = B·A                         [..., m, n]   (formed densely: O(m·n) memory, O(m·n·min(m, n)) time)
    ΔW = U·diag(S)·Vh                torch.linalg.svd (thin), S descending
    U, Vh = fix_signs(U, Vh)         largest-|.| entry of each column of U positive (lowrank.reference.rsvd)
    B' = U[:, :k]·diag(√S[:k])       [..., m, k]
    A' = diag(√S[:k])·Vh[:k]         [..., k, n]

so B'·A' is the best rank-k approximation of ΔW in every unitarily invariant norm (Eckart–Young–Mirsky) and
the two factors are balanced (B'ᵀB' = A'A'ᵀ = diag(S[:k])). This is PEFT's own way of shrinking an adapter
(``add_weighted_adapter(combination_type="svd")`` forms ΔW and runs a full SVD); it costs tens of seconds at
4096² and is the oracle the fast factored path is tested against. Computed in the inputs' dtype (fp32 / fp64),
no argument checking.

Reference: I. Vulić, A. Grycner, Q. de Laroussilhe, J. Pfeiffer, "LoRA-Squeeze: Simple and Effective
Post-Tuning and In-Tuning Compression of LoRA Modules", arXiv:2602.10993, 2026 (§3: reconstruct ΔW, truncated
(R)SVD, split the singular values between the new factors).
"""
from __future__ import annotations

import torch

from lowrank.reference.rsvd import fix_signs

__all__ = ["squeeze_lora", "truncated_delta"]


def squeeze_lora(lora_a: torch.Tensor, lora_b: torch.Tensor,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` LoRA factors of the dense ΔW = B·A by a full SVD.

    Returns ``(lora_a' [..., k, n], lora_b' [..., m, k], S [..., k], S_src [..., min(m, n)])``: the new
    factors, the kept singular values, and the whole spectrum of ΔW (zeros past rank r included).
    """
    delta = lora_b @ lora_a
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, vh = fix_signs(u[..., :rank], vh[..., :rank, :])
    root = s[..., :rank].sqrt()
    return root.unsqueeze(-1) * vh, u * root.unsqueeze(-2), s[..., :rank], s


def truncated_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ΔW = B·A, formed densely ``[..., m, n]``."""
    delta = lora_b @ lora_a
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
