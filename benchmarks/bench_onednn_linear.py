"""Benchmarks of ``lowrank.nn.OneDnnLinear`` (fp32 linear on oneDNN's fp32 GEMM) against fp32 ``nn.Linear``.

Per group ``f"onednn-{T}x{in}x{out}"``, forward under inference_mode, in one process:
  * "linear": fp32 ``nn.Linear`` (F.linear: MKL's sgemm), the peer and the floor it must beat: the op does the
    same arithmetic (2·T·in·out flops), so the only possible gain is the GEMM's speed;
  * "onednn": ``OneDnnLinear.from_linear`` (``lowrank::onednn_linear``). ``extra_info.max_rel_err`` records
    max |y − y_fp64| / max |y_fp64| of each (oneDNN's sums are 2–3× less exact than MKL's).
Shapes: MiniLM's attention and FFN at 8 sequences of 256 tokens (2048×384×384, 2048×384×1536, 2048×1536×384),
SmolLM2-135M's MLP (2048×576×1536), BERT-base's FFN (2048×768×3072).

    pytest benchmarks/bench_onednn_linear.py --benchmark-only     # timed
"""
from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import fp32_linear_case
from lowrank.nn import OneDnnLinear

BENCHMARKED_OPS = {"onednn_linear"}

SHAPES = ((2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (2048, 576, 1536), (2048, 768, 3072))
SMOKE_SHAPES = ((17, 40, 24),)


@functools.lru_cache(maxsize=1)
def _layers(shape: tuple[int, int, int]):
    lin, x, exact = fp32_linear_case(shape)
    return {"linear": lin, "onednn": OneDnnLinear.from_linear(lin)}, x, exact


@pytest.mark.parametrize("impl", ["linear", "onednn"])
@pytest.mark.parametrize("shape_index", range(len(SHAPES)))
def test_onednn_linear(run_benchmark, benchmark, shape_index, impl):
    shapes = SMOKE_SHAPES if benchmark.disabled else SHAPES
    if shape_index >= len(shapes):
        pytest.skip("smoke mode runs one small shape")
    shape = shapes[shape_index]
    layers, x, exact = _layers(shape)
    layer = layers[impl]
    benchmark.group = f"onednn-{'x'.join(map(str, shape))}"

    def fwd():
        with torch.inference_mode():
            return layer(x)
    y = run_benchmark(fwd)
    if y is None:
        y = fwd()
    benchmark.extra_info.update(impl=impl, max_rel_err=float((y.double() - exact).abs().max() / exact.abs().max()))
