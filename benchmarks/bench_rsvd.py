"""Benchmarks of the randomized truncated SVD ``lowrank.linalg.rsvd`` vs its peers.

Per group ``f"rsvd-fp32-{m}x{n}-k{k}"``, on A = U₀·diag(1/i)·V₀ᵀ (a slowly decaying spectrum, fp32):
  * "lowrank":      ``lowrank.linalg.rsvd(A, k)`` at its defaults (p = max(10, ⌈k/2⌉), n_iter="auto", QR panels).
  * "lowrank-lu":   the same with ``normalizer="lu"``;  "lowrank-cholqr2": with ``normalizer="cholqr2"``.
  * "lowrank-bf16": ``rsvd(A, k, sketch_dtype=torch.bfloat16, n_iter=2, normalizer="cholqr2")``: the range
                    finder's products on bf16 matrix hardware, the last product in fp32 (rsvd.SKETCH_DTYPE).
  * "lowrank-p10":  ``rsvd(A, k, oversample=10)``: the same work as torch.svd_lowrank (6 products with A of
                    k + 10 columns), so the two times compare like for like.
  * "torch":        ``torch.svd_lowrank(A, q=k+10, niter=2)`` (its k leading triplets): the peer.
  * "torch-samework": ``torch.svd_lowrank`` with lowrank's own l = k + p and iteration count (read from a
                    run outside the timing): the same products as "lowrank", hence about the same error, so
                    the two times compare at equal error.
  * "fbpca":        ``fbpca.pca(A, k, raw=True)`` at its defaults (l = k + 2, n_iter = 2, LU panels); skipped
                    with a reason when fbpca is not installed.
  * "sklearn":      ``sklearn.utils.extmath.randomized_svd(A, k)`` at its defaults (on the numpy view of A);
                    skipped with a reason when scikit-learn is not installed.
The floor is 2q + 2 GEMMs of m×n×l (see NOTES.md). ``extra_info["rel_error"]`` records ‖A − U·S·Vh‖₂ / σ_{k+1}
(the ratio to the optimal rank-k error) of the timed method; 1 is optimal.

Timed runs use 4096×4096 with k = 64 and 256 and 4096×11008 (a LLaMA-7B FFN shape) with k = 128; under
``--benchmark-disable`` (the CI smoke) 512×512 (k = 16, 64) and 512×1376 (k = 32) keep the suite fast.
"""
from __future__ import annotations

import functools

import pytest
import torch

from lowrank.linalg import rsvd, rsvd_error
from lowrank.linalg.rsvd import default_oversample

# rsvd is plain PyTorch: no torch.ops.lowrank op is benchmarked here (tests/test_registry.py reads this name).
BENCHMARKED_OPS = set()

FULL = ((4096, 4096, 64), (4096, 4096, 256), (4096, 11008, 128))
SMOKE = ((512, 512, 16), (512, 512, 64), (512, 1376, 32))
IMPLS = ("lowrank", "lowrank-lu", "lowrank-cholqr2", "lowrank-bf16", "lowrank-p10", "torch", "torch-samework",
         "sklearn", "fbpca")


def _sklearn_randomized_svd():
    try:
        from sklearn.utils.extmath import randomized_svd
    except ImportError:
        return None
    return randomized_svd


def _fbpca():
    try:
        import fbpca
    except ImportError:
        return None
    return fbpca


@functools.lru_cache(maxsize=3)
def _matrix(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [m, n] fp32 with singular values 1/i (built outside any timed call) and those values (fp64)."""
    g = torch.Generator().manual_seed(0)
    r = min(m, n)
    # fp32 QR for the orthonormal factors: the 11008×4096 one would take minutes in fp64, and A's spectrum is
    # then measured exactly enough for an error ratio (orthogonality to ~1e-6).
    u0 = torch.linalg.qr(torch.randn(m, r, generator=g)).Q.double()
    v0 = torch.linalg.qr(torch.randn(n, r, generator=g)).Q.double()
    s = 1.0 / torch.arange(1, r + 1, dtype=torch.float64)
    return ((u0 * s) @ v0.T).float().contiguous(), s


def _call(impl: str, a: torch.Tensor, k: int):
    if impl == "lowrank":
        return lambda: rsvd(a, k)[:3]
    if impl == "lowrank-lu":
        return lambda: rsvd(a, k, normalizer="lu")[:3]
    if impl == "lowrank-cholqr2":
        return lambda: rsvd(a, k, normalizer="cholqr2")[:3]
    if impl == "lowrank-bf16":
        return lambda: rsvd(a, k, sketch_dtype=torch.bfloat16, n_iter=2, normalizer="cholqr2")[:3]
    if impl == "lowrank-p10":
        return lambda: rsvd(a, k, oversample=10)[:3]
    if impl in ("torch", "torch-samework"):
        q, niter = k + 10, 2
        if impl == "torch-samework":
            ours = rsvd(a, k)
            q, niter = min(k + default_oversample(k), *a.shape), ours.n_iter

        def run():
            u, s, v = torch.svd_lowrank(a, q=q, niter=niter)
            return u[:, :k], s[:k], v[:, :k].T
        return run
    if impl == "fbpca":
        fbpca = _fbpca()
        a_np = a.numpy()

        def run():
            u, s, vt = fbpca.pca(a_np, k, raw=True)
            return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vt)
        return run
    randomized_svd = _sklearn_randomized_svd()
    a_np = a.numpy()

    def run():
        u, s, vt = randomized_svd(a_np, k, random_state=0)
        return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vt)
    return run


def _rel_error(a: torch.Tensor, s_true: torch.Tensor, k: int, factors) -> float:
    u, s, vh = (t.double() for t in factors)
    a64 = a.double()
    if a.shape[0] <= 1024:
        err = torch.linalg.matrix_norm(a64 - (u * s) @ vh, ord=2).item()
    else:   # matrix-free power estimate (a lower bound within ~0.5% here): a full SVD of 4096² takes ~10-50 s
        err = rsvd_error(a64, u, s, vh, n_iter=15, block=8, generator=torch.Generator().manual_seed(1)).item()
    return err / s_true[k].item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [0, 1, 2])
def test_rsvd(run_benchmark, benchmark, impl, case):
    m, n, k = (SMOKE if benchmark.disabled else FULL)[case]
    if impl == "sklearn" and _sklearn_randomized_svd() is None:
        pytest.skip("scikit-learn is not installed (pip install scikit-learn)")
    if impl == "fbpca" and _fbpca() is None:
        pytest.skip("fbpca is not installed (pip install fbpca)")
    a, s_true = _matrix(m, n)
    benchmark.group = f"rsvd-fp32-{m}x{n}-k{k}"
    fn = _call(impl, a, k)
    factors = run_benchmark(fn)
    rel = _rel_error(a, s_true, k, factors)
    benchmark.extra_info.update(impl=impl, m=m, n=n, k=k, dtype="float32", spectrum="1/i",
                                threads=torch.get_num_threads(), rel_error=rel)
    assert factors[0].shape == (m, k) and factors[1].shape == (k,) and factors[2].shape == (k, n)
    if impl.startswith("lowrank") and impl != "lowrank-p10":
        assert rel <= 1.02, f"{impl}: ‖A − USVh‖₂ / σ_(k+1) = {rel:.4f}"
