"""Randomized truncated SVD (Halko–Martinsson–Tropp) with cheap panel normalizers, and an a-posteriori error
estimate.

For A ``[..., m, n]`` (a tensor or a matrix-free :class:`~lowrank.linalg.operators.LinearOperator`), rank k,
oversampling p (default max(10, ⌈k/2⌉): see DEFAULT_OVERSAMPLE) and q power iterations (default "auto":
see AUTO_ITERATIONS), with l = min(k + p, m, n):

    Ω ~ N(0, 1)^{n×l}        one draw shared by every batch element, so A·Ω is one (batch·m)×n×l GEMM
    Q = N(A·Ω)
    repeat q times:  Q = N(A·N(Aᵀ·Q))                  N = the panel normalizer ("qr" | "lu" | "cholqr2")
    Q = orth(Q)              the last basis is orthonormal: Householder QR ("qr", "lu") or CholeskyQR2
    B = Qᵀ·A = (Aᵀ·Q)ᵀ       [..., l, n]
    B = Û·Σ·Vᵀ;  U = Q·Û     truncated to the k leading triplets, signs fixed (largest-|.| entry of each
                             column of U positive)

Only the span of the intermediate panels matters, so they need not be orthonormal, only well-conditioned:
  * "qr":      Householder QR (2·m·l² flops), the textbook choice and the default.
  * "lu":      Q = P·L from partial-pivoted LU (m·l² flops, unit-lower L with |Lᵢⱼ| ≤ 1); as in fbpca/sklearn.
  * "cholqr2": CholeskyQR twice: R = chol(YᵀY), Q = Y·R⁻¹, repeated once; a GEMM-rich 2·m·l² flops. If a
               Cholesky fails or the first pass is too far from orthonormal (‖Q₁ᵀQ₁ − I‖_F > 1/2, which is
               where the second pass stops guaranteeing O(ε) orthogonality, i.e. cond(Y) ≳ ε^{-1/2}: a
               numerically rank-deficient panel, e.g. a FactoredOperator whose inner rank is below l), that
               panel is orthonormalized by Householder QR instead and the reason is appended to
               ``RSVDResult.notes``. Never silently wrong.
The cost is 2q + 2 products with A (each m·n·l multiply-adds), which dominate everything else for
l ≪ min(m, n): the normalizers touch only [m, l] / [n, l] panels. This module is plain PyTorch on purpose:
the work is GEMM and QR/LU/Cholesky of tall panels, for which ATen already calls the BLAS/LAPACK (MKL, cuBLAS,
cuSOLVER) floor, so a C++ or Triton kernel would gain nothing here.

Mixed precision (``sketch_dtype=torch.bfloat16``, SKETCH_DTYPE): the products that only find the subspace (the
sketch and the power iterations) run from a bf16 copy of A on bf16 matrix hardware; the panels and the last
product Bᵀ = Aᵀ·Q stay in the compute dtype, so the error stays at the fp32 method's level for spectra whose
tail σ_{k+1} is above ~10⁻³·σ₁, at a fraction of the time where bf16 GEMMs run on AMX or tensor cores.

Exact dispatch: when l ≥ EXACT_FRACTION·min(m, n) or min(m, n) ≤ SMALL_DIM, the randomized method costs about
as much as a full ``torch.linalg.svd`` and is less accurate, so the exact SVD is used (an operator is then
formed densely); ``RSVDResult.method`` says which path ran.

Error estimate: :func:`rsvd_error` estimates ‖A − U·diag(S)·Vh‖₂ by block power iteration on the residual
operator E = A − U·diag(S)·Vh applied matrix-free (E·x = A·x − U·(S ⊙ Vh·x)).

Reference: Halko, Martinsson, Tropp, SIAM Review 53(2), 2011 (Alg. 4.4 and 5.1; §4.6 on the a-posteriori
estimate); Fukaya et al., "CholeskyQR2", 2014. The plain algorithm is ``lowrank.reference.rsvd``.
"""
from __future__ import annotations

import operator

import torch

from lowrank.linalg.operators import LinearOperator, aslinearoperator
from lowrank.reference.rsvd import fix_signs, gaussian_test_matrix

__all__ = ["rsvd", "rsvd_error", "RSVDResult", "NORMALIZERS", "EXACT_FRACTION", "SMALL_DIM", "AUTO_TOL",
           "default_oversample", "SKETCH_DTYPE"]

NORMALIZERS = ("qr", "lu", "cholqr2")
EXACT_FRACTION = 0.5  # exact SVD when k + oversample >= EXACT_FRACTION * min(m, n) ...
SMALL_DIM = 32        # ... or when min(m, n) <= SMALL_DIM
_METHODS = ("auto", "randomized", "exact")
AUTO_MIN_ITER = 2     # n_iter="auto": at least this many power iterations ...
AUTO_MAX_ITER = 8     # ... at most this many ...
AUTO_TOL = 5e-3       # ... stopping once no leading singular value estimate moves by more than AUTO_TOL·σ̂_k

AUTO_ITERATIONS = """n_iter="auto": power iterations until the k leading singular value estimates settle.

A fixed q = 2 is enough for decaying spectra (σᵢ = 1/i, 4096², k = 64: ‖A − U·S·Vh‖₂/σ_{k+1} = 1.0001) but not
for the flat spectra of trained weights: on the 36 Linear weights of all-MiniLM-L6-v2 (σ_max/σ_median ≈ 5)
q = 2 left 1.090 (k = 16) and 1.068 (k = 64), q = 4 still 1.030 / 1.018. The iteration already forms Aᵀ·Q with
an orthonormal Q, whose singular values are the current estimates σ̂; computing them costs an n×l SVD, small
next to the two m×n×l products of an iteration. After iteration i ≥ AUTO_MIN_ITER the loop stops when
max_{j≤k} |σ̂ⱼ⁽ⁱ⁾ − σ̂ⱼ⁽ⁱ⁻¹⁾| ≤ AUTO_TOL·σ̂ₖ⁽ⁱ⁾, and at AUTO_MAX_ITER in any case; that Aᵀ·Q is then reused as the
final Bᵀ, so stopping costs no extra product. Measured (error/optimal at the stop): MiniLM worst layer
k = 16: 1.007 after 7 iterations, k = 64: ≤ 1.004; 1/i spectrum 1024², k = 16/64: 1.0000 after 3.
``RSVDResult.n_iter`` reports how many ran; a batch runs one count, until every element has settled.
"""

DEFAULT_OVERSAMPLE = """Default oversampling p = max(10, ⌈k/2⌉) with n_iter = 2.

With the textbook p = 10 and q = 2 (torch.svd_lowrank's q = k + 10, niter = 2) the error on a slowly decaying
spectrum (σᵢ = 1/i) is far from optimal once k is not small, because the gap σ_{k+1}/σ_{l+1} = (l+1)/(k+1)
that the power iteration feeds on shrinks as p/k: measured ‖A − U·S·Vh‖₂/σ_{k+1} = 1.04–1.06 (k=64) and 1.14
(k=256) on 4096² fp32. Growing p with k restores the gap; it is cheaper than more iterations (each costs two
passes over A): at 4096², k=256, 2 threads, p = 128, q = 2 gave 0.998–1.000 in 0.94 s vs p = 10, q = 4 giving
1.048 in 1.12 s (p = 10, q = 2: 1.14 in 0.69 s). At 512×384 and 384×512, k=64, p = 32, q = 2 gave ≤ 1.003 over
10 seeds in fp32 and fp64 (k=16: ≤ 1.002).
"""


SKETCH_DTYPE = """sketch_dtype=torch.bfloat16: the range finder on bf16 matrix hardware.

The cost of rsvd is its 2q + 2 products with A. Only the last one, Bᵀ = Aᵀ·Q, decides how exact the result is
for a given basis Q; the others only find the subspace, and a rounding of A to bf16 (E = A − bf16(A), entries
within 2⁻⁹ relative) moves what they find by about ‖E‖₂, which for a matrix of independent roundings is
≈ 2⁻⁹·‖A‖_F·(√m + √n)/√(m·n): 8·10⁻⁵·σ₁ for the 4096² test matrix with σᵢ = 1/i, against σ_{k+1} = 0.015·σ₁
(k = 64) and 0.004·σ₁ (k = 256). So with the last product in fp32 the error stays at the fp32 method's level
unless the tail σ_{k+1} is below ~10⁻³·σ₁. Measured with n_iter=2, normalizer="cholqr2" (σᵢ = 1/i, Intel
Xeon with AMX, 2 threads, benchmarks/bench_rsvd.py "lowrank-bf16"): err/opt 1.000 / 0.996 / 0.999 in 70 / 268 /
308 ms at 4096² k=64 / 4096² k=256 / 4096×11008 k=128, against torch.svd_lowrank(q=k+10, niter=2) at 1.035 /
1.135 / 1.072 in 115 / 401 / 409 ms (docs/benchmarks.md, "rsvd with a bf16 sketch"). With n_iter="auto" the settling
test allows for the estimates' own bf16 noise (±2⁻⁸ relative), so it stops after 2–3 iterations.
"""


def default_oversample(rank: int) -> int:
    """p = max(10, ⌈rank/2⌉) (see DEFAULT_OVERSAMPLE for the measurements behind it)."""
    return max(10, -(-rank // 2))
_CHOLQR_MAX_DEVIATION = 0.5


class RSVDResult(tuple):
    """Result of :func:`rsvd`: unpacks like ``torch.linalg.svd`` as ``U, S, Vh = rsvd(A, k)``.

    ``U [..., m, k]``, ``S [..., k]`` (descending), ``Vh [..., k, n]``. Attributes: ``method`` is "exact" or
    "randomized"; ``n_iter`` the power iterations run (0 for exact); ``notes`` lists every fallback taken (e.g. CholeskyQR2 → QR) with its reason, empty when none.
    """

    method: str
    notes: tuple[str, ...]
    n_iter: int

    def __new__(cls, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, method: str,
                notes: tuple[str, ...] = (), n_iter: int = 0) -> "RSVDResult":
        self = super().__new__(cls, (U, S, Vh))
        self.method = method
        self.notes = tuple(notes)
        self.n_iter = n_iter
        return self

    @property
    def U(self) -> torch.Tensor:
        return self[0]

    @property
    def S(self) -> torch.Tensor:
        return self[1]

    @property
    def Vh(self) -> torch.Tensor:
        return self[2]

    def __repr__(self) -> str:
        return (f"RSVDResult(U={tuple(self.U.shape)}, S={tuple(self.S.shape)}, Vh={tuple(self.Vh.shape)}, "
                f"method={self.method!r}, n_iter={self.n_iter}, notes={self.notes!r})")


# ----------------------------------------------------------------------------------------------- checks
def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _compute_dtype(in_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32, torch.float64 or None, got {dtype}")
        return dtype
    if in_dtype in (torch.float32, torch.float64):
        return in_dtype
    if in_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    raise TypeError(f"A must have a real floating dtype (float64/32, bfloat16, float16), got {in_dtype}")


def _check_input(a, name: str = "A"):
    """Validate A (tensor or operator); return (shape, input dtype)."""
    if isinstance(a, torch.Tensor):
        shape, in_dtype = tuple(a.shape), a.dtype
    elif isinstance(a, LinearOperator):
        shape, in_dtype = tuple(a.shape), a.dtype
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a LinearOperator (shape, dtype, matmul, rmatmul), "
                        f"got {type(a).__name__}")
    if len(shape) < 2:
        raise ValueError(f"{name} must have at least 2 dimensions [..., m, n], got shape {shape}")
    if isinstance(a, torch.Tensor):
        _compute_dtype(in_dtype, None)
    return shape, in_dtype


def _check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """Raise if ``t`` (A itself, or a product of A with a Gaussian matrix) holds inf/nan.

    Checking the sketch A·Ω instead of A costs nothing next to the GEMM (a full ``isfinite`` pass over A took
    ~25% of the run time at 4096², k=64) and detects an inf/nan of A with probability one: it reaches every
    entry of its row of A·Ω through a non-zero Gaussian weight.
    """
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"A contains non-finite values (inf or nan), or its entries overflow {t.dtype}: "
                         f"found in {what}")
    return t


# ------------------------------------------------------------------------------------------ normalizers
def _qr(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _lu(y: torch.Tensor) -> torch.Tensor:
    """P·L of the partial-pivoted LU Y = P·L·U: a basis of span(Y) with bounded entries (no m×m P formed)."""
    lu, piv = torch.linalg.lu_factor(y)
    m, l = y.shape[-2:]
    low = torch.tril(lu[..., :, :l], diagonal=-1)
    low.diagonal(dim1=-2, dim2=-1).fill_(1)
    # LAPACK pivots (1-based) are sequential row swaps: (Pᵀ·Y)[i] = Y[perm[i]], so (P·L)[perm[i]] = L[i].
    perm = torch.arange(m, device=y.device).expand(*y.shape[:-2], m).clone()
    piv = piv.long() - 1
    for j in range(min(m, l)):
        pj = piv[..., j:j + 1]
        a, b = perm[..., j:j + 1].clone(), torch.gather(perm, -1, pj)
        perm[..., j:j + 1] = b
        perm.scatter_(-1, pj, a)
    out = torch.empty_like(low)
    out.scatter_(-2, perm.unsqueeze(-1).expand_as(low), low)
    return out


def _cholqr_pass(y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One CholeskyQR pass: (Y·R⁻¹, YᵀY), or (None, None) if the Cholesky of the Gram matrix fails."""
    g = y.mT @ y
    r, info = torch.linalg.cholesky_ex(g, upper=True)
    if bool((info != 0).any()):
        return None, g
    return torch.linalg.solve_triangular(r, y, upper=True, left=False), g


def _cholqr2(y: torch.Tensor, notes: list[str], where: str) -> torch.Tensor:
    q1, _ = _cholqr_pass(y)
    if q1 is not None:
        g1 = q1.mT @ q1
        eye = torch.eye(g1.shape[-1], dtype=g1.dtype, device=g1.device)
        dev = torch.linalg.matrix_norm(g1 - eye).max().item()
        if dev <= _CHOLQR_MAX_DEVIATION:
            r2, info = torch.linalg.cholesky_ex(g1, upper=True)
            if not bool((info != 0).any()):
                return torch.linalg.solve_triangular(r2, q1, upper=True, left=False)
            reason = "the second Cholesky failed"
        else:
            reason = (f"the first pass left ‖QᵀQ − I‖_F = {dev:.2e} > {_CHOLQR_MAX_DEVIATION} "
                      f"(panel condition number ≳ ε^(-1/2))")
    else:
        reason = "the Cholesky of the Gram matrix YᵀY failed (panel numerically rank-deficient)"
    notes.append(f"cholqr2 → Householder QR for the {where} panel {tuple(y.shape)}: {reason}")
    return _qr(y)


def _normalize(y: torch.Tensor, normalizer: str, notes: list[str], where: str, final: bool) -> torch.Tensor:
    if normalizer == "cholqr2":
        return _cholqr2(y, notes, where)
    if normalizer == "lu" and not final:
        return _lu(y)
    return _qr(y)


# ------------------------------------------------------------------------------------------------ rsvd
def _settled(s_prev: torch.Tensor, s_cur: torch.Tensor, k: int, rel_noise: float = 0.0) -> bool:
    """Whether every leading estimate moved by at most AUTO_TOL·σ̂ₖ (AUTO_ITERATIONS); a zero A is settled.

    ``rel_noise``: the relative rounding noise of the estimates themselves (a bf16 sketch: each σ̂ᵢ is read
    from a bf16 product, ±2⁻⁸·σ̂ᵢ), below which a move is not evidence of an unsettled subspace.
    """
    scale = s_cur[..., k - 1:k].clamp_min(torch.finfo(s_cur.dtype).eps * s_cur[..., :1].clamp_min(
        torch.finfo(s_cur.dtype).tiny))
    tol = torch.maximum(AUTO_TOL * scale, rel_noise * s_cur[..., :k])
    return bool(((s_cur[..., :k] - s_prev[..., :k]).abs() <= tol).all())


def _dense(op) -> torch.Tensor:
    if hasattr(op, "dense"):
        return op.dense()
    *batch, m, n = op.shape
    eye = torch.eye(n, dtype=op.dtype, device=getattr(op, "device", torch.device("cpu")))
    return op.matmul(eye.expand(*batch, n, n))


def rsvd(a: torch.Tensor | LinearOperator, rank: int, *, oversample: int | None = None,
         n_iter: int | str = "auto",
         normalizer: str = "qr", generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
         method: str = "auto", sketch_dtype: torch.dtype | None = None) -> RSVDResult:
    """Rank-``rank`` truncated SVD A ≈ U·diag(S)·Vh by randomized subspace iteration (module docstring).

    Args:
        a: ``[..., m, n]`` tensor (fp64, fp32; bf16/fp16 are computed in fp32) or a LinearOperator.
        rank: k, 1 ≤ k ≤ min(m, n): exactly k triplets are returned.
        oversample: p ≥ 0 extra sketch columns (l = min(k + p, m, n)); default None = max(10, ⌈k/2⌉), see
            DEFAULT_OVERSAMPLE.
        n_iter: q ≥ 0 power (subspace) iterations, each costing two products with A; default "auto":
            iterate until the leading singular values settle (AUTO_ITERATIONS).
        normalizer: "qr" | "lu" | "cholqr2": how the intermediate panels are re-normalized.
        generator: torch.Generator for the Gaussian test matrix (reproducible results).
        dtype: compute and result dtype (float32 / float64); default A's dtype, float32 for bf16/fp16.
        method: "auto" (exact SVD for small problems: EXACT_FRACTION / SMALL_DIM), "randomized" or "exact".
        sketch_dtype: dtype of the range finder's products with A (the sketch A·Ω and the power iterations);
            default None = the compute dtype. ``torch.bfloat16`` runs them from a bf16 copy of A (made once,
            half of A's fp32 size) on bf16 matrix hardware (AMX / AVX512-BF16 CPUs, tensor cores), while the
            panels, their normalization and the last product Bᵀ = Aᵀ·Q stay in the compute dtype: see
            SKETCH_DTYPE. Only worth it where bf16 GEMMs are much faster than fp32 ones (not on AVX2-only
            CPUs, which emulate them).

    Returns:
        RSVDResult(U ``[..., m, k]``, S ``[..., k]``, Vh ``[..., k, n]``, method, notes), S descending, the
        largest-|.| entry of each column of U positive.

    Raises:
        TypeError: A is not a tensor/operator or not real floating; rank/oversample/n_iter not integers;
            bad dtype or generator.
        ValueError: A has < 2 dimensions or non-finite entries; rank outside [1, min(m, n)]; oversample < 0;
            n_iter < 0; unknown normalizer or method; sketch_dtype not a floating dtype.
    """
    shape, in_dtype = _check_input(a)
    m, n = shape[-2:]
    rank = _check_int("rank", rank, 1)
    if rank > min(m, n):
        raise ValueError(f"rank must be <= min(m, n) = {min(m, n)} for A of shape {shape}, got {rank}")
    oversample = default_oversample(rank) if oversample is None else _check_int("oversample", oversample, 0)
    auto_iter = isinstance(n_iter, str)
    if auto_iter and n_iter != "auto":
        raise ValueError(f"n_iter must be a non-negative integer or 'auto', got {n_iter!r}")
    n_iter = AUTO_MAX_ITER if auto_iter else _check_int("n_iter", n_iter, 0)
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    cdtype = _compute_dtype(in_dtype, dtype)
    if sketch_dtype is not None and sketch_dtype not in (torch.bfloat16, torch.float16, torch.float32,
                                                         torch.float64):
        raise TypeError(f"sketch_dtype must be a floating dtype (bfloat16, float16, float32, float64) or "
                        f"None, got {sketch_dtype!r}")
    op = aslinearoperator(a, cdtype)
    l = min(rank + oversample, m, n)

    if method == "auto":
        small = l >= EXACT_FRACTION * min(m, n) or min(m, n) <= SMALL_DIM
        method = "exact" if small else "randomized"
    if method == "exact":
        dense = _check_finite(_dense(op), "A")
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        u, vh = fix_signs(u[..., :rank], vh[..., :rank, :])
        return RSVDResult(u, s[..., :rank], vh, "exact")

    notes: list[str] = []
    device = getattr(op, "device", torch.device("cpu"))
    omega = gaussian_test_matrix(n, l, cdtype, device, generator)
    sketched = sketch_dtype is not None and sketch_dtype != cdtype
    # Two roundings (of A and of the panel) of the sketch dtype's unit roundoff each, doubled for margin.
    noise = 4 * torch.finfo(sketch_dtype).eps / 2 if sketched else 0.0
    if not sketched:
        sketch_mul, sketch_rmul = op.matmul, op.rmatmul
    else:
        sop = aslinearoperator(a, sketch_dtype)
        def sketch_mul(x):
            return sop.matmul(x.to(sketch_dtype)).to(cdtype)

        def sketch_rmul(x):
            return sop.rmatmul(x.to(sketch_dtype)).to(cdtype)
    y = _check_finite(sketch_mul(omega), "the sketch A·Ω")
    bt, s_prev, done = None, None, n_iter
    for i in range(n_iter):
        if auto_iter and normalizer == "lu":   # the estimates need an orthonormal basis, which LU does not give
            q = _qr(y)
        else:
            q = _normalize(y, normalizer, notes, f"A·Q (iteration {i})", final=False)
        if auto_iter:
            bt = sketch_rmul(q)
            s_cur = torch.linalg.svdvals(bt)
            if i >= AUTO_MIN_ITER and _settled(s_prev, s_cur, rank, noise):
                done = i
                break
            s_prev = s_cur
            z = _normalize(bt, normalizer, notes, f"Aᵀ·Q (iteration {i + 1})", final=False)
            bt = None
        else:
            z = _normalize(sketch_rmul(q), normalizer, notes, f"Aᵀ·Q (iteration {i + 1})", final=False)
        y = sketch_mul(z)
    if bt is not None and sketched:
        bt = op.rmatmul(q)           # the last product in the compute dtype: the result is only as exact as B
    if bt is None:
        q = _normalize(y, normalizer, notes, "final", final=True)
        bt = op.rmatmul(q)                                          # Bᵀ = Aᵀ·Q  [..., n, l]
    w, s, xh = torch.linalg.svd(bt, full_matrices=False)           # Bᵀ = W·Σ·Xᵀ  =>  B = X·Σ·Wᵀ
    u = q @ xh[..., :rank, :].mT
    vh = w[..., :, :rank].mT
    u, vh = fix_signs(u, vh)
    return RSVDResult(u, s[..., :rank], vh.contiguous(), "randomized", tuple(notes), done)


# ---------------------------------------------------------------------------------------------- error
def rsvd_error(a: torch.Tensor | LinearOperator, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, *,
               n_iter: int = 8, block: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimate ‖A − U·diag(S)·Vh‖₂ per batch element, matrix-free.

    Block power iteration on the residual E = A − U·diag(S)·Vh (E·x = A·x − U·(S ⊙ Vh·x),
    Eᵀ·y = Aᵀ·y − Vhᵀ·(S ⊙ Uᵀ·y)) from a Gaussian n×b start: X ← orth(Eᵀ·E·X) ``n_iter`` times, then the
    largest singular value of E·X. It is a lower bound of the true norm that tightens as
    (σ_{b+1}/σ₁)^{2·n_iter} for the residual's own singular values; 2·n_iter + 1 products of A with b columns.

    Shapes: A ``[..., m, n]``, U ``[..., m, k]``, S ``[..., k]``, Vh ``[..., k, n]``; returns ``[...]`` in the
    factors' dtype.
    """
    shape, in_dtype = _check_input(a)
    m, n = shape[-2:]
    n_iter = _check_int("n_iter", n_iter, 0)
    block = _check_int("block", block, 1)
    for name, t in (("U", u), ("S", s), ("Vh", vh)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    k = s.shape[-1]
    if u.shape[-2:] != (m, k) or vh.shape[-2:] != (k, n):
        raise ValueError(f"U {tuple(u.shape)}, S {tuple(s.shape)}, Vh {tuple(vh.shape)} do not factor an "
                         f"A of shape {shape}: expected U [..., {m}, {k}] and Vh [..., {k}, {n}]")
    cdtype = u.dtype if u.dtype in (torch.float32, torch.float64) else torch.float32
    op = aslinearoperator(a, cdtype)
    u, s, vh = u.to(cdtype), s.to(cdtype), vh.to(cdtype)

    def e_mul(x):
        return op.matmul(x) - u @ (s.unsqueeze(-1) * (vh @ x))

    def e_rmul(y):
        return op.rmatmul(y) - vh.mT @ (s.unsqueeze(-1) * (u.mT @ y))

    device = getattr(op, "device", torch.device("cpu"))
    x = _qr(gaussian_test_matrix(n, min(block, n), cdtype, device, generator))
    for _ in range(n_iter):
        x = _qr(e_rmul(e_mul(x)))
    return torch.linalg.matrix_norm(e_mul(x), ord=2)
