"""Reference randomized SVD: the textbook Halko–Martinsson–Tropp algorithm, the specification of
``lowrank.linalg.rsvd``.

Given A ``[..., m, n]``, a target rank k, an oversampling p and q power iterations, with l = min(k + p, m, n):

    Ω  ~ N(0, 1)^{n×l}                                   (one draw, shared by every batch element)
    Q  = qr(A·Ω)                                         Alg. 4.1 (range finder)
    repeat q times:  Q̃ = qr(Aᵀ·Q);  Q = qr(A·Q̃)        Alg. 4.4 (randomized subspace iteration)
    B  = Qᵀ·A              [..., l, n]
    B  = Û·Σ·Vᵀ            (exact thin SVD of the small matrix)
    U  = Q·Û,  truncated to the leading k triplets                      Alg. 5.1 (direct SVD)

Signs are made deterministic: the largest-|.| entry of each column of U is positive (the matching row of Vᵀ is
flipped with it). Shapes out: U ``[..., m, k]``, S ``[..., k]``, Vh ``[..., k, n]``. Computed in A's dtype
(fp32 or fp64), dense input only, no argument checking: see ``lowrank.linalg.rsvd`` for the public function.

Reference: N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness: probabilistic
algorithms for constructing approximate matrix decompositions", SIAM Review 53(2), 2011.
"""
from __future__ import annotations

import torch


def fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each triplet so that the largest-|.| entry of each column of U is positive (first one on ties)."""
    idx = u.abs().argmax(dim=-2, keepdim=True)                      # [..., 1, k]
    sign = torch.sign(torch.gather(u, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, vh * sign.mT


def gaussian_test_matrix(n: int, l: int, dtype: torch.dtype, device: torch.device,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Ω ``[n, l]`` with i.i.d. N(0, 1) entries, drawn on the generator's device (if any) then moved."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(n, l, dtype=dtype, device=draw_device, generator=generator).to(device)


def rsvd(a: torch.Tensor, rank: int, *, oversample: int = 10, n_iter: int = 2,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized rank-``rank`` SVD of ``a [..., m, n]`` by HMT subspace iteration with a QR after every
    product. Returns (U ``[..., m, k]``, S ``[..., k]``, Vh ``[..., k, n]``)."""
    m, n = a.shape[-2:]
    l = min(rank + oversample, m, n)
    omega = gaussian_test_matrix(n, l, a.dtype, a.device, generator)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(n_iter):
        q = torch.linalg.qr(a.mT @ q).Q
        q = torch.linalg.qr(a @ q).Q
    b = q.mT @ a
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub
    u, vh = fix_signs(u[..., :rank], vh[..., :rank, :])
    return u, s[..., :rank], vh
