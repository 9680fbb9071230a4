"""Query-row attention mass (``lowrank.ops.query_attention_mass``) against forming the attention weights.

An ICR reranker needs Σ over the query rows of each head's causal softmax(q·kᵀ/√d). Per group
``f"{dtype}-H{Hq}/{Hkv}-n{n}-nq{nq}-d{d}"``:
  * "full": what ``output_attentions=True`` does per layer: scores for all n rows (n×n per head), causal mask,
    softmax, then the column sums of the nq query rows: the peer.
  * "torch": the reference: scores for the nq query rows only, masked softmax, column sums (in ATen).
  * "lowrank": the C++ kernel (one row at a time, O(n) memory per thread, fp32 accumulation).
Floor (flops): 2·nq·n·d per head for the scores (plus one exp per score); the peer does n/nq times more work and
writes n² floats per head. Shapes: SmolLM2-135M (9 query heads, 3 KV heads, d=64) at 2k and 4k keys, 16 query
rows; one layer (an ICR pass does this for each of the 30 layers).

    pytest benchmarks/bench_query_attention_mass.py --benchmark-only
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from lowrank.ops import query_attention_mass

BENCHMARKED_OPS = {"query_attention_mass", "query_attention_mass_triton"}   # read by tests/test_registry.py

SHAPES = ((9, 3, 2048, 16, 64), (9, 3, 4096, 16, 64))
DTYPES = (torch.float32, torch.bfloat16)
IMPLS = ("full", "torch", "lowrank")
SMOKE_SHAPE = (4, 2, 33, 3, 8)   # --benchmark-disable (CI) runs each case once on this small shape


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def _sid(s):
    return "H{}/{}-n{}-nq{}-d{}".format(*s)


@functools.lru_cache(maxsize=1)
def _inputs(dtype, shape):
    Hq, Hkv, n, nq, d = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, Hq, nq, d, generator=g).to(dtype)
    k = torch.randn(1, Hkv, n, d, generator=g).to(dtype)
    q_all = torch.randn(1, Hq, n, d, generator=g).to(dtype)   # the peer recomputes every row
    q_all[:, :, n - nq:] = q
    return q, k, q_all


def _full(q_all, k, nq):
    n, d = k.shape[2], k.shape[3]
    kk = k.repeat_interleave(q_all.shape[1] // k.shape[1], dim=1)
    s = (q_all @ kk.transpose(-1, -2)).float() / math.sqrt(d)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1)[:, :, n - nq:].sum(2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_query_attention_mass(run_benchmark, benchmark, dtype, shape, impl):
    shape = SMOKE_SHAPE if benchmark.disabled else shape
    q, k, q_all = _inputs(dtype, shape)
    nq = shape[3]
    benchmark.group = f"{_name(dtype)}-{_sid(shape)}"
    benchmark.extra_info.update(impl=impl, dtype=_name(dtype), Hq=shape[0], Hkv=shape[1], n=shape[2], nq=nq,
                                d=shape[4])
    calls = {"full": lambda: _full(q_all, k, nq),
             "torch": lambda: query_attention_mass(q, k, backend="torch"),
             "lowrank": lambda: query_attention_mass(q, k, backend="cpp")}
    with torch.inference_mode():
        out = run_benchmark(calls[impl])
    want = query_attention_mass(q, k, backend="torch")
    torch.testing.assert_close(out, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-3)


@pytest.mark.parametrize("impl", ["torch", "cuda", "triton"])
def test_query_attention_mass_gpu(run_benchmark, benchmark, impl):
    """GPU: reference vs the "cuda" and "triton" kernels. Skipped without CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; Triton on CPU runs only in its (slow) interpreter")
    q, k, _ = (t.cuda() for t in _inputs(torch.bfloat16, SHAPES[1]))
    benchmark.group = "gpu-bfloat16"
    benchmark.extra_info.update(impl=impl)
    run_benchmark(lambda: (query_attention_mass(q, k, backend=impl), torch.cuda.synchronize()))
