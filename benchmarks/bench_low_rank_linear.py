"""Benchmarks of ``lowrank.nn.LowRankLinear`` (y = (x·Vᵀ)·Uᵀ + b) against the dense ``nn.Linear`` it replaces.

Per group ``f"{dtype}-{T}x{in}x{out}"``: "linear" is the dense layer (the peer and the floor a compressed layer
must beat), and "lowrank-k{k}" the factored layer at the ranks a 0.5 / 0.25 parameter budget gives,
k = ⌊β·in·out/(in + out)⌋. Arithmetic floor: time ∝ flops, so LowRankLinear/Linear ≈ β at large T. The two
GEMMs of the factored layer are ordinary GEMMs for these k (tens to hundreds) and go to ATen's oneDNN/MKL,
whose speed they get; the intermediate x·Vᵀ [T, k] is small next to x and y. Forward under inference_mode.
Shapes: MiniLM's FFN (2048×384×1536, 2048×1536×384), BERT-base FFN (2048×768×3072), a 7B projection at
prefill (512×4096×4096).

    pytest benchmarks/bench_low_rank_linear.py --benchmark-only     # timed
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lowrank.nn import LowRankLinear

# LowRankLinear calls no torch.ops.lowrank op yet (tests/test_registry.py reads this name).
BENCHMARKED_OPS = set()

SHAPES = ((2048, 384, 1536), (2048, 1536, 384), (2048, 768, 3072), (512, 4096, 4096))
SMOKE_SHAPES = ((17, 40, 24),)
BUDGETS = (0.5, 0.25)
DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=2)
def _layers(dtype: torch.dtype, shape: tuple[int, int, int]):
    t, n_in, n_out = shape
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(n_in, n_out).to(dtype)
    x = torch.randn(t, n_in, generator=g).to(dtype)
    low = {b: LowRankLinear.from_linear(lin, max(1, int(b * n_in * n_out / (n_in + n_out)))) for b in BUDGETS}
    return lin, low, x


@pytest.mark.parametrize("impl", ["linear", *[f"budget{b}" for b in BUDGETS]])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_index", range(len(SHAPES)))
def test_low_rank_linear(run_benchmark, benchmark, shape_index, dtype, impl):
    shapes = SMOKE_SHAPES if benchmark.disabled else SHAPES
    if shape_index >= len(shapes):
        pytest.skip("smoke mode runs one small shape")
    shape = shapes[shape_index]
    lin, low, x = _layers(dtype, shape)
    layer = lin if impl == "linear" else low[float(impl.removeprefix("budget"))]
    benchmark.group = f"low_rank_linear-{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}"
    rank = getattr(layer, "rank", None)
    benchmark.extra_info.update(impl=impl if rank is None else f"{impl}-k{rank}", rank=rank,
                                params=sum(p.numel() for p in layer.parameters()))

    def fwd():
        with torch.inference_mode():
            return layer(x)
    y = run_benchmark(fwd)
    assert y.shape == (shape[0], shape[2]) and y.dtype == dtype
