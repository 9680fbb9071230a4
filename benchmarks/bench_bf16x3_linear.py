"""Benchmarks of ``lowrank.nn.Bf16x3Linear`` (fp32 linear from three bf16 products) against fp32 ``nn.Linear``.

Per group ``f"bf16x3-{T}x{in}x{out}"``, forward under inference_mode, in one process:
  * "linear-fp32": fp32 ``nn.Linear`` (MKL sgemm on Intel): the peer, whose outputs bf16x3 must reproduce;
  * "linear-bf16": the same layer in bf16 (oneDNN on AMX): the speed floor. bf16x3 does three of its products,
    so ~3× its time is the arithmetic floor, but its error is ~1e-3 relative, which bf16x3 brings to ~1e-5;
  * "bf16x3": ``Bf16x3Linear.from_linear`` (AMX kernel, packed weight cached), the ratio that matters being
    bf16x3 / linear-fp32. ``extra_info.max_rel_err`` records max |y − y_fp64| / max |y_fp64| of each impl.
Shapes: MiniLM's attention and FFN at 8 sequences of 256 tokens (2048×384×384, 2048×384×1536, 2048×1536×384),
SmolLM2-135M's MLP (2048×576×1536), a 4096² projection at 512 tokens. Skipped (with the reason) on CPUs without AMX.

    pytest benchmarks/bench_bf16x3_linear.py --benchmark-only     # timed
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from benchmarks.conftest import fp32_linear_case
from lowrank.nn import Bf16x3Linear
from lowrank.ops._backends import cpu_isa

# cpu_isa is a query, timed implicitly by every call; the Triton twin is timed only where a GPU exists.
BENCHMARKED_OPS = {"bf16x3_linear", "bf16x3_linear_triton", "bf16x3_pack", "cpu_isa"}

SHAPES = ((2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (2048, 576, 1536), (512, 4096, 4096))
SMOKE_SHAPES = ((17, 40, 24),)


@functools.lru_cache(maxsize=1)
def _layers(shape: tuple[int, int, int]):
    lin, x, exact = fp32_linear_case(shape)
    return {"linear-fp32": (lin, x), "bf16x3": (Bf16x3Linear.from_linear(lin), x)}, exact


def _bf16_layer(lin: nn.Linear) -> nn.Linear:
    low = nn.Linear(lin.in_features, lin.out_features).to(torch.bfloat16)
    low.load_state_dict(lin.state_dict())
    return low


@pytest.mark.parametrize("impl", ["linear-fp32", "linear-bf16", "bf16x3"])
@pytest.mark.parametrize("shape_index", range(len(SHAPES)))
def test_bf16x3_linear(run_benchmark, benchmark, shape_index, impl):
    if cpu_isa() != "amx":
        pytest.skip(f"Bf16x3Linear's CPU kernel needs AMX tiles; this CPU's level is {cpu_isa()!r}")
    shapes = SMOKE_SHAPES if benchmark.disabled else SHAPES
    if shape_index >= len(shapes):
        pytest.skip("smoke mode runs one small shape")
    shape = shapes[shape_index]
    layers, exact = _layers(shape)
    lin, x = layers["linear-fp32"]
    if impl == "linear-bf16":
        layer, xin = _bf16_layer(lin), x.bfloat16()
    else:
        layer, xin = layers[impl][0], x
    benchmark.group = f"bf16x3-{'x'.join(map(str, shape))}"

    def fwd():
        with torch.inference_mode():
            return layer(xin)
    y = run_benchmark(fwd)
    if y is None:
        y = fwd()
    benchmark.extra_info.update(impl=impl, max_rel_err=float((y.double() - exact).abs().max() / exact.abs().max()))
