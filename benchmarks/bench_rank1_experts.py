"""Benchmarks of the mixture of rank-1 experts LoRA (``lowrank.ops.rank1_experts_lora``) vs its peer and floor.

Per group ``f"{mode}-{gate}-{dtype}-{T}x{in}x{out}"`` three implementations over the same tensors (E = 64 experts,
k = 8 per token, lora_b non-zero so no path can skip the expand):
  * "linear":  ``F.linear(x, W, b)``, no experts at all: the floor.
  * "dense":   the dense masked PyTorch implementation as the papers' code writes it
               (``lowrank.reference.rank1_experts_lora_dense``: all E ranks computed, then masked): the peer.
  * "lowrank": ``Rank1ExpertsLinear`` (ops ``lowrank::rank1_experts_lora`` / ``_backward``; lora_a and the router
               in one [2E, in] buffer, as the module keeps them).
Gates: "router" (SMoRA, sigmoid router with the balancing bias) and "self" (MoRA).
Modes: "fwd" under ``torch.inference_mode``; "fwd+bwd" with the base frozen and x requiring grad (the floor is
the Linear's forward + dx GEMM), backward of a precomputed grad of ones, gradients set to None after each step.
Arithmetic floor over nn.Linear (extra multiply-adds / base ones): forward (E·in [router] + k·in [h at the selected
experts] + k·out) / (in·out) for "router" and (E·in + k·out) / (in·out) for "self"; at 768×768: 10.4% / 9.4%
(benchmarks/rank1_experts_table.py has the forward + backward floor too).

    pytest benchmarks/bench_rank1_experts.py --benchmark-disable     # CI smoke: small shapes, each case once
    pytest benchmarks/bench_rank1_experts.py --benchmark-only --benchmark-json=out.json
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from lowrank.nn import Rank1ExpertsLinear
from lowrank.reference import rank1_experts_lora_dense

# torch.ops.lowrank ops these benchmarks exercise (tests/test_registry.py checks every op is benchmarked somewhere).
BENCHMARKED_OPS = {"rank1_experts_lora", "rank1_experts_lora_backward", "rank1_experts_lora_triton"}

E, K = 64, 8
SHAPES = ((2048, 768, 768), (2048, 768, 3072), (512, 4096, 4096), (8, 4096, 4096))
SMOKE = ((17, 33, 65), 8, 3)   # --benchmark-disable (CI): shape, E, k
DTYPES = (torch.float32, torch.bfloat16)
GATES = ("router", "self")
MODES = ("fwd", "fwd+bwd")
IMPLS = ("linear", "dense", "lowrank")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=1)
def _layer(dtype: torch.dtype, shape: tuple[int, int, int], gate: str, experts: int, k: int):
    """(module, x, grad of ones): built outside any timed call; one kept alive at a time."""
    T, in_f, out_f = shape
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, dtype=dtype)
    m = Rank1ExpertsLinear.from_linear(lin, experts, k, gate)
    with torch.no_grad():
        m.lora_b.copy_(torch.randn(out_f, experts, generator=g) * 0.02)
    x = torch.randn(T, in_f, generator=g).to(dtype)
    return m, x, torch.ones(T, out_f, dtype=dtype)


def _forward(impl, m, x):
    if impl == "linear":
        return F.linear(x, m.weight, m.bias)
    if impl == "dense":
        kw = {"router": m.router, "router_bias": m.router_bias} if m.gate == "router" else {}
        return rank1_experts_lora_dense(x, m.weight, m.bias, m.lora_a, m.lora_b, m.top_k, scaling=m.scaling,
                                        gate=m.gate, **kw)[0]
    return m(x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("gate", GATES)
def test_rank1_experts(run_benchmark, benchmark, gate, dtype, shape, mode, impl):
    shape, experts, k = SMOKE if benchmark.disabled else (shape, E, K)
    m, x, ones = _layer(dtype, shape, gate, experts, k)
    T, in_f, out_f = shape
    benchmark.group = f"{mode}-{gate}-{_dtype_name(dtype)}-{T}x{in_f}x{out_f}"
    benchmark.extra_info.update(impl=impl, mode=mode, gate=gate, dtype=_dtype_name(dtype), T=T, in_features=in_f,
                                out_features=out_f, experts=experts, top_k=k, threads=torch.get_num_threads())
    m.train(mode != "fwd")
    if mode == "fwd":
        with torch.inference_mode():
            run_benchmark(lambda: _forward(impl, m, x))
        return
    xg = x.detach().requires_grad_(True)
    params = [p for p in (m.lora_a, m.lora_b, m.router) if p is not None]

    def step():
        _forward(impl, m, xg).backward(ones)
        xg.grad = None
        for p in params:
            p.grad = None
    run_benchmark(step)
    m.expert_counts.zero_()


@pytest.mark.parametrize("impl", ["linear", "dense", "cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rank1_experts_gpu(run_benchmark, benchmark, shape, dtype, impl):
    """GPU forward, gate "router": cuBLAS F.linear (floor), the dense masked peer, the "cuda" and "triton" backends.
    Skipped without CUDA (the Triton interpreter's speed means nothing; tests/ops checks its numbers)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; Triton on CPU runs only in its (slow) interpreter")
    from lowrank.ops import rank1_experts_lora

    T, in_f, out_f = shape
    m, x, _ = _layer(dtype, shape, "router", E, K)
    m = m.cuda().eval()
    x = x.cuda()
    benchmark.group = f"gpu-fwd-router-{_dtype_name(dtype)}-{T}x{in_f}x{out_f}"
    benchmark.extra_info.update(impl=impl, mode="fwd", gate="router", dtype=_dtype_name(dtype), T=T,
                                in_features=in_f, out_features=out_f, experts=E, top_k=K)
    if impl in ("linear", "dense"):
        def call():
            return _forward(impl, m, x)
    else:
        def call():
            return rank1_experts_lora(x, m.weight, m.bias, m.lora_a, m.lora_b, K, router=m.router,
                                      router_bias=m.router_bias, backend=impl)

    def step():
        out = call()
        torch.cuda.synchronize()
        return out
    with torch.inference_mode():
        run_benchmark(step)
