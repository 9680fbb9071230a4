"""Per-layer low-rank factorization of a Linear weight in a (data-aware) metric.

For a weight W [m, n] (out × in) the best rank-k approximation is taken in a weighted Frobenius metric

    minimize over rank(Ŵ) ≤ k:   ‖D·(W − Ŵ)·S‖_F

with D = diag(d) [m, m] a positive row weighting and S [n, n] an invertible column transform. Its solution
(Eckart–Young applied to M = D·W·S) is

    M = D·W·S = P·Σ·Qᵀ (SVD),    Ŵ_k = D⁻¹·P_k·Σ_k·Q_kᵀ·S⁻¹,
    factors  U = D⁻¹·P_k·Σ_k^{1/2}  [m, k],    V = Σ_k^{1/2}·Q_kᵀ·S⁻¹  [k, n],    Ŵ_k = U·V,

and the error of every rank is read off the spectrum:  ‖D·(W − Ŵ_k)·S‖_F² = Σ_{i>k} σᵢ².
(Σ is split evenly, U = P√Σ, V = √ΣQᵀ, so both factors have the same scale when the layer is fine-tuned.)

The metrics (``kind``):
  * "svd":    D = I, S = I: plain truncated SVD, error ‖W − Ŵ‖_F.
  * "whiten": SVD-LLM. C = XᵀX/N [n, n] from calibration activations X [N, n]; S = chol(C + λI) (lower), so
              S·Sᵀ = C + λI and ‖(W − Ŵ)·S‖_F² = ‖(W − Ŵ)·Xᵀ‖_F²/N + λ‖W − Ŵ‖_F²: the output error on the
              calibration tokens (plus a ridge). λ = ridge·tr(C)/n with a small relative ``ridge`` so that a
              rank-deficient C (fewer tokens than features, dead features) still has an invertible S; if the
              Cholesky still fails, λ grows ×10 and the factorization records a note.
  * "asvd":   ASVD. S = diag(s), sᵢ = (mean_t |x_{t,i}|)^α (α = 0.5 by default), floored at a small fraction
              of its mean so that S⁻¹ stays bounded.
  * "fwsvd":  FWSVD. D = diag(√Iᵢ) with Iᵢ = Σ_j Σ_batches (∂L/∂W_ij)² the Fisher information summed over row
              i (from :func:`lowrank.compress.calibrate.collect_fisher`), floored like ASVD's scales.

Exact SVD is used by default (MiniLM-sized layers take milliseconds); with ``exact=False`` only the leading
``max_rank`` triplets are computed by :func:`lowrank.linalg.rsvd` and the tail energy comes from ‖M‖_F².
All factorization math runs in float64 (small matrices; whitening can be ill-conditioned); factors are cast
back to the weight's dtype by the caller.

References: Eckart & Young 1936; Wang et al., "SVD-LLM: Truncation-aware SVD for LLM compression", ICLR 2025;
Yuan et al., "ASVD: Activation-aware SVD for compressing LLMs", 2023; Hsu et al., "Language model compression
with weighted low-rank factorization" (FWSVD), ICLR 2022.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["KINDS", "LayerSpectrum", "factorize", "whitening_transform", "asvd_scale", "fisher_row_scale",
           "check_weight", "check_rank"]

KINDS = ("svd", "whiten", "asvd", "fwsvd")
_SCALE_FLOOR = 1e-3   # ASVD / FWSVD scales are floored at this fraction of their mean: S⁻¹ must stay bounded
_MAX_RIDGE_STEPS = 8  # λ grows ×10 at most this many times before the whitening gives up


def check_weight(weight: object, name: str = "weight") -> torch.Tensor:
    """Validate a 2-D, real floating, finite weight; returns it unchanged."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point() or weight.is_complex():
        raise TypeError(f"{name} must be a real floating tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    return weight


def check_rank(rank: object, m: int, n: int, name: str = "rank") -> int:
    """Validate 1 ≤ rank ≤ min(m, n) (a Python int, not a bool)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"{name} must be in [1, min(out, in)] = [1, {min(m, n)}] for a {m}×{n} weight, "
                         f"got {rank}")
    return rank


def whitening_transform(xtx: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, float, list[str]]:
    """S = chol(C + λI) for a Gram matrix C = XᵀX/N [n, n] (float64 lower-triangular S, S·Sᵀ = C + λI).

    λ = ridge·tr(C)/n; if the Cholesky fails (C indefinite in floating point) λ grows ×10 and a note is
    returned.

    Returns:
        (S [n, n] float64, λ used, notes).
    """
    if not isinstance(xtx, torch.Tensor) or xtx.dim() != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"xtx must be a square [n, n] tensor, got "
                         f"{tuple(xtx.shape) if isinstance(xtx, torch.Tensor) else type(xtx).__name__}")
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a positive finite number, got {ridge!r}")
    c = xtx.detach().to(torch.float64)
    c = (c + c.T) / 2  # accumulated in pieces: symmetrize away the rounding
    if not bool(torch.isfinite(c).all()):
        raise ValueError("xtx has non-finite entries")
    n = c.shape[0]
    scale = float(torch.diagonal(c).sum()) / n
    if not scale > 0:
        raise ValueError("xtx is zero: no calibration activations reached this layer")
    notes: list[str] = []
    lam = ridge * scale
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    for _ in range(_MAX_RIDGE_STEPS + 1):
        s, info = torch.linalg.cholesky_ex(c + lam * eye)
        if int(info) == 0:
            return s, lam, notes
        notes.append(f"Cholesky of XᵀX/N + λI failed at λ = {lam:.3g}; λ raised ×10")
        lam *= 10
    raise ValueError(f"xtx is not positive semi-definite even with ridge λ = {lam / 10:.3g}")


def _floored(scale: torch.Tensor, name: str) -> torch.Tensor:
    s = scale.detach().to(torch.float64)
    if s.dim() != 1 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"{name} must be a finite non-negative 1-D tensor")
    mean = float(s.mean())
    if not mean > 0:
        raise ValueError(f"{name} is all zero")
    return s.clamp_min(_SCALE_FLOOR * mean)


def asvd_scale(abs_mean: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """ASVD's input scaling sᵢ = (mean_t |x_{t,i}|)^α [n] (float64), floored at 1e-3 × its mean."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return _floored(_floored(abs_mean, "abs_mean") ** alpha, "abs_mean ** alpha")


def fisher_row_scale(fisher_rows: torch.Tensor) -> torch.Tensor:
    """FWSVD's row weighting dᵢ = √Iᵢ [m] (float64) from the row-summed Fisher information Iᵢ."""
    return _floored(fisher_rows, "fisher_rows").sqrt()


@dataclass
class LayerSpectrum:
    """The factorization of one weight W [m, n] in the metric M = D·W·S (module docstring).

    Attributes:
        shape: (m, n).
        kind: "svd" | "whiten" | "asvd" | "fwsvd".
        s: singular values of M, descending, float64 [r] (r = min(m, n), or ``max_rank`` with
        ``exact=False``). total_energy: ‖M‖_F² (= Σ s² when the spectrum is complete).
        p: left singular vectors of M [m, r]; qh: right singular vectors [r, n] (float64).
        row_scale: d [m] or None (D = I); col_transform: S as a 1-D diagonal [n], a lower-triangular [n, n],
            or None (S = I).
        weight_norm2: ‖W‖_F².
        notes: fallbacks taken (e.g. a raised whitening ridge).
    """
    shape: tuple[int, int]
    kind: str
    s: torch.Tensor
    total_energy: float
    p: torch.Tensor
    qh: torch.Tensor
    row_scale: torch.Tensor | None
    col_transform: torch.Tensor | None
    weight_norm2: float
    notes: list[str] = field(default_factory=list)

    @property
    def max_rank(self) -> int:
        """Number of triplets held (the largest rank :meth:`factors` can build)."""
        return int(self.s.numel())

    def tail_energy(self, k: int) -> float:
        """‖D·(W − Ŵ_k)·S‖_F² = ‖M‖_F² − Σ_{i≤k} σᵢ² (≥ 0)."""
        head = float((self.s[:k] ** 2).sum()) if k > 0 else 0.0
        return max(self.total_energy - head, 0.0)

    def retained_energy(self, k: int) -> float:
        """Σ_{i≤k} σᵢ² / ‖M‖_F² in [0, 1] (1 for an all-zero weight)."""
        if self.total_energy <= 0:
            return 1.0
        return 1.0 - self.tail_energy(k) / self.total_energy

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [m, k], V [k, n]) in float64 with U·V = Ŵ_k, the optimum of the metric; Σ split evenly."""
        m, n = self.shape
        k = check_rank(k, m, n)
        if k > self.max_rank:
            raise ValueError(f"rank must be <= {self.max_rank} (triplets computed for this layer), got {k}")
        root = self.s[:k].sqrt()
        u = self.p[:, :k] * root                   # [m, k]
        v = root[:, None] * self.qh[:k]            # [k, n]
        if self.row_scale is not None:             # U = D⁻¹·P√Σ
            u = u / self.row_scale[:, None]
        t = self.col_transform
        if t is not None:                          # V = √ΣQᵀ·S⁻¹
            if t.dim() == 1:
                v = v / t[None, :]
            else:                                  # X·S = B for lower-triangular S
                v = torch.linalg.solve_triangular(t, v, upper=False, left=False)
        return u, v

    def approximation(self, k: int) -> torch.Tensor:
        """Ŵ_k = U·V [m, n] in float64."""
        u, v = self.factors(k)
        return u @ v


def factorize(weight: torch.Tensor, kind: str = "svd", *, xtx: torch.Tensor | None = None,
              abs_mean: torch.Tensor | None = None, fisher_rows: torch.Tensor | None = None,
              col_transform: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
              ridge: float = 1e-4, alpha: float = 0.5, exact: bool = True, max_rank: int | None = None,
              generator: torch.Generator | None = None) -> LayerSpectrum:
    """Factorize W [m, n] in the metric of ``kind`` (module docstring); the input is not modified.

    Args:
        weight: W [out, in], finite.
        kind: "svd" | "whiten" (needs ``xtx`` = XᵀX/N [n, n]) | "asvd" (needs ``abs_mean`` = mean |x| [n]) |
            "fwsvd" (needs ``fisher_rows`` [m]). Ignored when ``col_transform`` / ``row_scale`` are given
            explicitly (then kind is reported as "whiten" for a matrix S, "asvd" for a vector, "fwsvd" for a
            row scale alone).
        col_transform: explicit S, 1-D positive [n] (diagonal) or lower-triangular invertible [n, n].
        row_scale: explicit d [m], positive.
        ridge: relative whitening ridge (λ = ridge·tr(C)/n). alpha: ASVD exponent.
        exact: full SVD (default) or :func:`lowrank.linalg.rsvd` of the leading ``max_rank`` triplets.
        max_rank: with ``exact=False``, how many triplets to compute (default min(m, n)).
        generator: for the randomized path.
    """
    w = check_weight(weight)
    m, n = w.shape
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    notes: list[str] = []
    w64 = w.detach().to(torch.float64)
    d, t = None, None
    if col_transform is not None or row_scale is not None:
        if col_transform is not None:
            t = _check_transform(col_transform, n)
        if row_scale is not None:
            d = _floored(_check_vector(row_scale, m, "row_scale"), "row_scale")
        kind = "whiten" if (t is not None and t.dim() == 2) else ("asvd" if t is not None else "fwsvd")
    elif kind == "whiten":
        if xtx is None:
            raise ValueError("kind='whiten' needs xtx (XᵀX/N of the layer's calibration inputs)")
        if tuple(xtx.shape) != (n, n):
            raise ValueError(f"xtx must be [{n}, {n}] for a weight with in_features={n}, "
                             f"got {tuple(xtx.shape)}")
        t, _, wnotes = whitening_transform(xtx.to(w64.device), ridge)
        notes += wnotes
    elif kind == "asvd":
        if abs_mean is None:
            raise ValueError("kind='asvd' needs abs_mean (mean |x| of the layer's calibration inputs)")
        t = asvd_scale(_check_vector(abs_mean, n, "abs_mean").to(w64.device), alpha)
    elif kind == "fwsvd":
        if fisher_rows is None:
            raise ValueError("kind='fwsvd' needs fisher_rows (row sums of squared weight gradients)")
        d = fisher_row_scale(_check_vector(fisher_rows, m, "fisher_rows").to(w64.device))
    mat = w64
    if d is not None:
        mat = d[:, None] * mat
    if t is not None:
        mat = mat * t[None, :] if t.dim() == 1 else mat @ t
    total = float((mat * mat).sum())
    if exact:
        p, s, qh = torch.linalg.svd(mat, full_matrices=False)
    else:
        from lowrank.linalg import rsvd  # lazy: linalg is a sibling package
        k = min(m, n) if max_rank is None else check_rank(max_rank, m, n, "max_rank")
        res = rsvd(mat, k, generator=generator)
        p, s, qh = res.U, res.S, res.Vh
        notes += list(res.notes)
    return LayerSpectrum((m, n), kind, s, total, p, qh, d, t, float((w64 * w64).sum()), notes)


def _check_vector(v: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.numel() != size:
        raise ValueError(f"{name} must be a 1-D tensor of size {size}, got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    return v.detach()


def _check_transform(t: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"scale must be a torch.Tensor, got {type(t).__name__}")
    t64 = t.detach().to(torch.float64)
    if not bool(torch.isfinite(t64).all()):
        raise ValueError("scale has non-finite entries")
    if t64.dim() == 1:
        if t64.numel() != n or not bool((t64 > 0).all()):
            raise ValueError(f"scale as a vector must be [{n}] and positive, got shape {tuple(t64.shape)}")
        return t64
    if t64.shape != (n, n):
        raise ValueError(f"scale must be [{n}] or [{n}, {n}] for in_features={n}, got {tuple(t64.shape)}")
    if not torch.equal(t64, torch.tril(t64)):
        # a general invertible S: re-express it as a lower-triangular one with the same metric,
        # ‖E·S‖_F = ‖E·L‖_F for L = chol(S·Sᵀ), so V = √ΣQᵀ·L⁻¹ stays a triangular solve
        t64, info = torch.linalg.cholesky_ex(t64 @ t64.T)
        if int(info) != 0:
            raise ValueError("scale must be invertible")
    diag = torch.diagonal(t64).abs()
    if not bool((diag > 0).all()) or float(diag.min() / diag.max()) < 1e-12:
        raise ValueError("scale must be invertible (well-conditioned triangular factor)")
    return t64
