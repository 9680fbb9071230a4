"""Benchmarks of the randomized truncated SVD ``lowrank.linalg.rsvd`` vs its peers.

Per group ``f"rsvd-fp32-{m}x{n}-k{k}"``, on A = U₀·diag(1/i)·V₀ᵀ (a slowly decaying spectrum, fp32):
  * "lowrank":      ``lowrank.linalg.rsvd(A, k)`` at its defaults (p = max(10, ⌈k/2⌉), q = 2, QR panels).
  * "lowrank-lu":   the same with ``normalizer="lu"``;  "lowrank-cholqr2": with ``normalizer="cholqr2"``.
  * "lowrank-p10":  ``rsvd(A, k, oversample=10)``: the same work as torch.svd_lowrank (6 products with A of
                    k + 10 columns), so the two times compare like for like.
  * "torch":        ``torch.svd_lowrank(A, q=k+10, niter=2)`` (its k leading triplets): the peer.
  * "sklearn":      ``sklearn.utils.extmath.randomized_svd(A, k)`` at its defaults (on the numpy view of A);
                    skipped with a reason when scikit-learn is not installed.
The floor is 2q + 2 GEMMs of m×n×l (see NOTES.md). ``extra_info["rel_error"]`` records ‖A − U·S·Vh‖₂ / σ_{k+1}
(the ratio to the optimal rank-k error) of the timed method; 1 is optimal.

Timed runs use 4096×4096 with k = 64 and 256; under ``--benchmark-disable`` (the CI smoke) a 512×512 matrix
with k = 16 and 64 keeps the suite fast.
"""
from __future__ import annotations

import functools

import pytest
import torch

from lowrank.linalg import rsvd, rsvd_error

# rsvd is plain PyTorch: no torch.ops.lowrank op is benchmarked here (tests/test_registry.py reads this name).
BENCHMARKED_OPS = set()

FULL = {"n": 4096, "ks": (64, 256)}
SMOKE = {"n": 512, "ks": (16, 64)}
IMPLS = ("lowrank", "lowrank-lu", "lowrank-cholqr2", "lowrank-p10", "torch", "sklearn")


def _sklearn_randomized_svd():
    try:
        from sklearn.utils.extmath import randomized_svd
    except ImportError:
        return None
    return randomized_svd


@functools.lru_cache(maxsize=1)
def _matrix(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [n, n] fp32 with singular values 1/i (built in fp64, outside any timed call) and those values."""
    g = torch.Generator().manual_seed(0)
    u0 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    return ((u0 * s) @ v0.T).float().contiguous(), s


def _call(impl: str, a: torch.Tensor, k: int):
    if impl == "lowrank":
        return lambda: rsvd(a, k)[:3]
    if impl == "lowrank-lu":
        return lambda: rsvd(a, k, normalizer="lu")[:3]
    if impl == "lowrank-cholqr2":
        return lambda: rsvd(a, k, normalizer="cholqr2")[:3]
    if impl == "lowrank-p10":
        return lambda: rsvd(a, k, oversample=10)[:3]
    if impl == "torch":
        def run():
            u, s, v = torch.svd_lowrank(a, q=k + 10, niter=2)
            return u[:, :k], s[:k], v[:, :k].T
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
@pytest.mark.parametrize("k_index", [0, 1])
def test_rsvd(run_benchmark, benchmark, impl, k_index):
    cfg = SMOKE if benchmark.disabled else FULL
    n, k = cfg["n"], cfg["ks"][k_index]
    if impl == "sklearn" and _sklearn_randomized_svd() is None:
        pytest.skip("scikit-learn is not installed (pip install scikit-learn)")
    a, s_true = _matrix(n)
    benchmark.group = f"rsvd-fp32-{n}x{n}-k{k}"
    fn = _call(impl, a, k)
    factors = run_benchmark(fn)
    rel = _rel_error(a, s_true, k, factors)
    benchmark.extra_info.update(impl=impl, m=n, n=n, k=k, dtype="float32", spectrum="1/i",
                                threads=torch.get_num_threads(), rel_error=rel)
    assert factors[0].shape == (n, k) and factors[1].shape == (k,) and factors[2].shape == (k, n)
    if impl.startswith("lowrank") and impl != "lowrank-p10":
        assert rel <= 1.02, f"{impl}: ‖A − USVh‖₂ / σ_(k+1) = {rel:.4f}"
