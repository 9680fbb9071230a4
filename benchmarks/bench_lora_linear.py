"""Benchmarks of the fused LoRA linear ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` (s = alpha / r) vs its peer and floor.

Per group ``f"{mode}-{dtype}-{T}x{in}x{out}"`` three implementations over the same base weight storage and the
same non-zero factors (r=16, alpha=32; B non-zero so no path can skip the update):
  * "linear":  the bare ``nn.Linear``, no LoRA at all: the floor.
  * "peft":    PEFT's ``lora.Linear`` (``get_peft_model`` on a one-Linear model with
               ``autocast_adapter_dtype=False``, so its factors stay in the layer's dtype), timed as the layer
               itself: the peer.
  * "lowrank": ``lowrank.nn.LoRALinear.from_linear`` (ops ``lowrank::lora_linear`` forward and
               ``lowrank::lora_linear_backward``).
Modes:
  * "fwd":     forward under ``torch.inference_mode``.
  * "fwd+bwd": frozen base weight and bias, ``x`` requiring grad (as every layer but the first of a model
               sees); forward, then backward of a precomputed grad of ones, giving gradients for x, lora_a and
               lora_b (set to None before each step, as ``zero_grad()`` does). The bare Linear computes its
               forward and dx GEMMs: the floor LoRA training is measured against.
Shapes T×in×out: BERT-base attention (2048×768×768) and FFN (2048×768×3072), a 7B-class projection at prefill
(512×4096×4096) and at decode (8×4096×4096, and one token: 1×4096×4096). The arithmetic floor of each shape
is printed by report.py.

    pytest benchmarks --benchmark-disable          # CI smoke: every case once
    python benchmarks/report.py --run              # timed run + ratio table
"""
from __future__ import annotations

import functools

import pytest
import torch

from lowrank.cli import make_lora_peers, peft_available

# torch.ops.lowrank ops these benchmarks exercise (tests check every registered op is benchmarked somewhere).
BENCHMARKED_OPS = {"lora_linear", "lora_linear_backward", "lora_linear_triton"}

R, ALPHA = 16, 32
SHAPES = ((2048, 768, 768), (2048, 768, 3072), (512, 4096, 4096), (8, 4096, 4096), (1, 4096, 4096))
DTYPES = (torch.float32, torch.bfloat16)
MODES = ("fwd", "fwd+bwd")
IMPLS = ("linear", "peft", "lowrank")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


# Ordered so that consecutive cases share (dtype, shape) and the peers are built once per pair (see _peers).
CASES = [pytest.param(dtype, shape, mode, impl, id=f"{mode}-{_dtype_name(dtype)}-{_shape_id(shape)}-{impl}")
         for dtype in DTYPES for shape in SHAPES for mode in MODES for impl in IMPLS]


@functools.lru_cache(maxsize=1)
def _peers(dtype: torch.dtype, shape: tuple[int, int, int]):
    """The layers and inputs of one (dtype, shape), built outside any timed call; one pair kept alive."""
    return make_lora_peers(*shape, r=R, alpha=ALPHA, dtype=dtype, with_peft=peft_available())


@pytest.mark.parametrize("dtype, shape, mode, impl", CASES)
def test_lora_linear(run_peer_step, benchmark, dtype, shape, mode, impl):
    if impl == "peft" and not peft_available():
        pytest.skip("peft is not installed")
    peers = _peers(dtype, shape)
    T, in_f, out_f = shape
    benchmark.group = f"{mode}-{_dtype_name(dtype)}-{T}x{in_f}x{out_f}"
    benchmark.extra_info.update(impl=impl, mode=mode, dtype=_dtype_name(dtype), T=T, in_features=in_f,
                                out_features=out_f, r=R, alpha=ALPHA, threads=torch.get_num_threads())
    run_peer_step(peers, impl, mode)



@pytest.mark.parametrize("impl", ["linear", "cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_lora_linear_gpu(run_benchmark, benchmark, shape, dtype, impl):
    """GPU forward: cuBLAS nn.Linear (the floor) vs the "cuda" and "triton" backends. Skipped without CUDA: on
    CPU the Triton kernel runs in its interpreter, whose speed means nothing (tests/ops checks its numbers)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; Triton on CPU runs only in its (slow) interpreter")
    from lowrank.ops import lora_linear

    T, in_f, out_f = shape
    kw = {"device": torch.device("cuda"), "dtype": dtype}
    x = torch.randn(T, in_f, **kw)
    w = torch.randn(out_f, in_f, **kw) * in_f ** -0.5
    b = torch.randn(out_f, **kw)
    a = torch.randn(R, in_f, **kw) * in_f ** -0.5
    bb = torch.randn(out_f, R, **kw)
    benchmark.group = f"gpu-fwd-{_dtype_name(dtype)}-{T}x{in_f}x{out_f}"
    benchmark.extra_info.update(impl=impl, mode="fwd", dtype=_dtype_name(dtype), T=T, in_features=in_f,
                                out_features=out_f, r=R, alpha=ALPHA)
    if impl == "linear":
        def call():
            return torch.nn.functional.linear(x, w, b)
    else:
        def call():
            return lora_linear(x, w, b, a, bb, ALPHA / R, backend=impl)

    def step():
        out = call()
        torch.cuda.synchronize()
        return out
    with torch.inference_mode():
        run_benchmark(step)
