"""Benchmarks of LoRA-Squeeze ``lowrank.compress.squeeze_lora`` vs the dense peer and the floor.

Inputs: fp32 LoRA factors A [r, n], B [m, r] with ΔW = B·A = U₀·diag(0.9ⁱ)·V₀ᵀ and unbalanced factors
(B = U₀·diag(σ)·G, A = G⁺·V₀ᵀ), built once outside any timed call. Per group ``f"squeeze-fp32-{m}x{n}-r{r}-k{k}"``:
  * "lowrank":        ``squeeze_lora(A, B, k)`` (method="auto": the exact factored path, or RSVD for huge r).
  * "lowrank-exact" / "lowrank-rsvd": the two paths forced.
  * "dense-svd":      the peer, PEFT's approach (``add_weighted_adapter(combination_type="svd")``): form
                      ΔW = B·A, full ``torch.linalg.svd``, truncate, split √S (``lowrank.reference.squeeze``).
                      Only in the first group, and only when benchmarking is enabled (a 4096² SVD takes tens of
                      seconds; it is timed with 2 rounds, no warm-up, via ``benchmark.pedantic``).
  * "floor-qr":       ``torch.geqrf`` of B and of Aᵀ: the Householder QRs the exact path cannot avoid.
  * "floor-gemm":     Bᵀ·B and A·Aᵀ: the same 2·(m + n)·r² flops as plain GEMMs (the BLAS-3 speed limit).
``extra_info["rel_error"]`` = ‖ΔW − B'·A'‖_F / ‖ΔW − SVD_k(ΔW)‖_F (1 = optimal), computed in fp64 afterwards.

Timed runs use 4096×4096 (r = 64 → k = 16; r = 1024 → k = 16 for the RSVD path); under
``--benchmark-disable`` (the CI smoke) 512×512 with r = 64 → 16 and r = 256 → 8 keeps the file fast.

    pytest benchmarks/bench_squeeze.py --benchmark-only --benchmark-warmup=on --benchmark-json=squeeze.json
"""
from __future__ import annotations

import functools

import pytest
import torch

from lowrank.compress import squeeze_lora
from lowrank.reference.squeeze import squeeze_lora as dense_squeeze

# squeeze_lora is plain PyTorch: no torch.ops.lowrank op is benchmarked here (tests/test_registry.py reads
# this name).
BENCHMARKED_OPS = set()

FULL = ({"n": 4096, "r": 64, "k": 16}, {"n": 4096, "r": 1024, "k": 16})
SMOKE = ({"n": 512, "r": 64, "k": 16}, {"n": 512, "r": 256, "k": 8})
IMPLS = ("lowrank", "lowrank-exact", "lowrank-rsvd", "dense-svd", "floor-qr", "floor-gemm")
DENSE_ROUNDS = 2


@functools.lru_cache(maxsize=2)
def _factors(n: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, n], B [n, r] fp32, σ [r] fp64): ΔW = U₀·diag(0.9ⁱ)·V₀ᵀ from unbalanced factors."""
    g = torch.Generator().manual_seed(0)
    u0 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    sigma = 0.9 ** torch.arange(r, dtype=torch.float64)
    mix = torch.randn(r, r, generator=g, dtype=torch.float64) / r ** 0.5 + torch.eye(r, dtype=torch.float64)
    b = (u0 * sigma) @ mix
    a = torch.linalg.solve(mix, v0.mT)
    return a.float().contiguous(), b.float().contiguous(), sigma


def _call(impl: str, a: torch.Tensor, b: torch.Tensor, k: int):
    if impl == "lowrank":
        return lambda: squeeze_lora(a, b, k)[:2]
    if impl == "lowrank-exact":
        return lambda: squeeze_lora(a, b, k, method="exact")[:2]
    if impl == "lowrank-rsvd":
        return lambda: squeeze_lora(a, b, k, method="rsvd", generator=torch.Generator().manual_seed(0))[:2]
    if impl == "dense-svd":
        return lambda: dense_squeeze(a, b, k)[:2]
    if impl == "floor-qr":
        return lambda: (torch.geqrf(b), torch.geqrf(a.mT))
    return lambda: (b.mT @ b, a @ a.mT)


def _rel_error(a: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor, k: int, new_a, new_b) -> float:
    delta = b.double() @ a.double()
    err = torch.linalg.matrix_norm(delta - new_b.double() @ new_a.double()).item()
    return err / sigma[k:].square().sum().sqrt().item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [0, 1])
def test_squeeze(run_benchmark, benchmark, impl, case):
    cfg = (SMOKE if benchmark.disabled else FULL)[case]
    n, r, k = cfg["n"], cfg["r"], cfg["k"]
    if impl == "dense-svd" and case == 1:
        pytest.skip("the dense peer costs the same at any r (an n×n SVD): timed in the first group only")
    a, b, sigma = _factors(n, r)
    benchmark.group = f"squeeze-fp32-{n}x{n}-r{r}-k{k}"
    fn = _call(impl, a, b, k)
    if impl == "dense-svd" and not benchmark.disabled:
        out = benchmark.pedantic(fn, rounds=DENSE_ROUNDS, iterations=1, warmup_rounds=0)
    else:
        out = run_benchmark(fn)
    benchmark.extra_info.update(impl=impl, m=n, n=n, r=r, k=k, dtype="float32", spectrum="0.9^i",
                                threads=torch.get_num_threads())
    if impl.startswith("floor"):
        return
    new_a, new_b = out
    assert new_a.shape == (k, n) and new_b.shape == (n, k)
    rel = _rel_error(a, b, sigma, k, new_a, new_b)
    benchmark.extra_info["rel_error"] = rel
    if impl in ("lowrank-exact", "dense-svd") or (impl == "lowrank" and r <= 256):
        assert abs(rel - 1) <= 1e-4, f"{impl}: error / optimal = {rel:.6f}"
    else:
        assert rel <= 1.02, f"{impl}: error / optimal = {rel:.6f}"
