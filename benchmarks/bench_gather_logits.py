"""Identifier-logit gather (``lowrank.ops.gather_logits``) against the full-vocabulary projection it replaces.

Per group ``f"{dtype}-T{T}-V{V}-d{d}-k{k}"``:
  * "full": ``F.linear(h, W)[:, ids]``, the V-wide LM-head projection a causal LM computes at the last position
    (transformers with ``logits_to_keep=1``), then the k columns a listwise reranker reads: the peer.
  * "torch": the reference ``F.linear(h, W[ids])`` (gather k rows, then a k-wide product).
  * "lowrank": the C++ kernel (one dot product per (token, identifier), no [k, d] copy of the rows).
Floor: the k·d head elements (k = 20: 46 KB of SmolLM2's 113 MB fp32 head) — a few µs of memory traffic, so the
op is dispatch-bound; the peer is bound by reading all V·d elements (113 MB at ~25 GB/s ≈ 4.5 ms for SmolLM2).
Shapes: SmolLM2-135M's tied head (V=49152, d=576) and a Llama-3-8B head (V=128256, d=4096), one position, k=20.

    pytest benchmarks/bench_gather_logits.py --benchmark-only
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from lowrank.ops import gather_logits

BENCHMARKED_OPS = {"gather_logits", "gather_logits_triton"}   # read by tests/test_registry.py

SHAPES = ((1, 49152, 576, 20), (1, 128256, 4096, 20))
DTYPES = (torch.float32, torch.bfloat16)
IMPLS = ("full", "torch", "lowrank")
SMOKE_SHAPE = (1, 999, 33, 5)   # --benchmark-disable (CI) runs each case once on this small shape


def _name(dtype):
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=1)
def _inputs(dtype, shape):
    T, V, d, k = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) * d ** -0.5).to(dtype)
    ids = torch.randperm(V, generator=g)[:k]
    return h, w, ids


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-V{}-d{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_gather_logits(run_benchmark, benchmark, dtype, shape, impl):
    shape = SMOKE_SHAPE if benchmark.disabled else shape
    h, w, ids = _inputs(dtype, shape)
    benchmark.group = f"{_name(dtype)}-" + "T{}-V{}-d{}-k{}".format(*shape)
    benchmark.extra_info.update(impl=impl, dtype=_name(dtype), T=shape[0], V=shape[1], d=shape[2], k=shape[3])
    calls = {"full": lambda: F.linear(h, w)[:, ids],
             "torch": lambda: gather_logits(h, w, ids, backend="torch"),
             "lowrank": lambda: gather_logits(h, w, ids, backend="cpp")}
    with torch.inference_mode():
        out = run_benchmark(calls[impl])
    torch.testing.assert_close(out.float(), F.linear(h.float(), w.float())[:, ids], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", ["full", "cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_name)
def test_gather_logits_gpu(run_benchmark, benchmark, dtype, impl):
    """GPU: full projection vs the "cuda" and "triton" kernels. Skipped without CUDA (the interpreter's speed
    means nothing; tests/ops checks its numbers)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; Triton on CPU runs only in its (slow) interpreter")
    h, w, ids = (t.cuda() for t in _inputs(dtype, SHAPES[1]))
    benchmark.group = f"gpu-{_name(dtype)}"
    benchmark.extra_info.update(impl=impl)
    call = (lambda: F.linear(h, w)[:, ids]) if impl == "full" else (lambda: gather_logits(h, w, ids, backend=impl))
    run_benchmark(lambda: (call(), torch.cuda.synchronize()))
