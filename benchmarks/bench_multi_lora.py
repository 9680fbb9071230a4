"""Benchmarks of the multi-adapter LoRA linear (``lowrank.ops.multi_lora_linear``) vs its peer and floor.

A batch of B = 8 sequences, each served by one of 4 adapters (r = 16, alpha = 32, adapters 0,1,2,3,0,1,2,3), x of
shape [8, T/8, in]. Per group ``f"{mode}-{dtype}-{T}x{in}x{out}"``, over the same base weight and factors:
  * "linear":      the bare ``nn.Linear`` (no adapter at all): the floor;
  * "peft":        PEFT's ``lora.Linear`` holding the 4 adapters, called with ``adapter_names=`` (its mixed-batch
                   forward: base layer, then per adapter ``x[idx]`` through lora_A / lora_B and ``result[idx] +=``);
  * "lowrank":     ``multi_lora_linear`` with the segment metadata built once per batch outside the call (a model
                   builds it once for all its layers: ``lowrank.nn.MultiLoRALinear`` / ``adapter_context``);
  * "lowrank-ids": the same, building the segments from the ids inside the timed call (what one lone layer costs).
Modes: "fwd" under ``torch.inference_mode``; "fwd+bwd" with the base frozen and x requiring grad (forward, then
backward of a precomputed grad of ones; gradients for x and the factors).

    pytest benchmarks/bench_multi_lora.py --benchmark-disable      # CI smoke: one small shape, each case once
    pytest benchmarks/bench_multi_lora.py --benchmark-only --benchmark-warmup=on --benchmark-json=out.json
    python benchmarks/bench_multi_lora.py --threads 1 --repeats 15   # interleaved: one call of each in turn
The interleaved mode prints a markdown table (medians, and the ratio of minima); on a shared machine it is the
more trustworthy of the two, since load changes hit every implementation alike.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lowrank.cli import peft_available
from lowrank.ops import adapter_segments, multi_lora_linear

BENCHMARKED_OPS = {"multi_lora_linear", "multi_lora_linear_backward", "multi_lora_linear_triton"}

R, ALPHA, N_ADAPTERS, SEQS = 16, 32, 4, 8
SHAPES = ((2048, 768, 768), (2048, 768, 3072), (512, 4096, 4096), (8, 4096, 4096))
SMOKE_SHAPE = (16, 64, 48)   # --benchmark-disable (CI) runs each case once on this small shape
DTYPES = (torch.float32, torch.bfloat16)
MODES = ("fwd", "fwd+bwd")
IMPLS = ("linear", "peft", "lowrank", "lowrank-ids")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear


class Peers:
    """One layer with 4 adapters three ways, over one base weight; inputs built once."""

    def __init__(self, T: int, in_f: int, out_f: int, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)

        def randn(*shape, std=1.0):
            return (torch.randn(*shape, generator=gen) * std).to(dtype)

        self.linear = nn.Linear(in_f, out_f, device="meta", dtype=dtype)
        self.linear.weight = nn.Parameter(randn(out_f, in_f, std=in_f ** -0.5), requires_grad=False)
        self.linear.bias = nn.Parameter(randn(out_f, std=0.1), requires_grad=False)
        self.lora_a = nn.Parameter(randn(N_ADAPTERS, R, in_f, std=in_f ** -0.5))
        self.lora_b = nn.Parameter(randn(N_ADAPTERS, out_f, R, std=R ** -0.5 / 4))
        self.scaling = [ALPHA / R] * N_ADAPTERS
        self.x = randn(SEQS, T // SEQS, in_f)
        self.grad = torch.ones(SEQS, T // SEQS, out_f, dtype=dtype)
        sample_ids = torch.arange(SEQS) % N_ADAPTERS
        self.adapter_names = [f"a{i}" for i in sample_ids.tolist()]
        self.ids = sample_ids.repeat_interleave(T // SEQS).reshape(SEQS, T // SEQS)
        self.seg = adapter_segments(self.ids, N_ADAPTERS)
        self.peft = self._peft() if peft_available() else None

    def _peft(self) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)
        model = get_peft_model(_Holder(self.linear), cfg, adapter_name="a0", autocast_adapter_dtype=False)
        for i in range(1, N_ADAPTERS):
            model.add_adapter(f"a{i}", cfg)
        layer = model.base_model.model.proj
        with torch.no_grad():
            for i in range(N_ADAPTERS):
                layer.lora_A[f"a{i}"].weight.copy_(self.lora_a[i])
                layer.lora_B[f"a{i}"].weight.copy_(self.lora_b[i])
        for name, p in layer.named_parameters():  # add_adapter leaves the new adapters frozen
            p.requires_grad_("lora_" in name)
        layer.to(self.linear.weight.dtype)
        self.linear.weight.requires_grad_(False)
        self.linear.bias.requires_grad_(False)
        return layer

    def trainable(self, impl: str) -> list[torch.Tensor]:
        if impl == "linear":
            return []
        if impl == "peft":
            return [p for n, p in self.peft.named_parameters() if "lora_" in n]
        return [self.lora_a, self.lora_b]

    def forward(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        if impl == "linear":
            return lin(x)
        if impl == "peft":
            return self.peft(x, adapter_names=self.adapter_names)
        ids = self.seg if impl == "lowrank" else self.ids
        return multi_lora_linear(x, lin.weight, lin.bias, self.lora_a, self.lora_b, ids, self.scaling)

    def step(self, impl: str, mode: str):
        if mode == "fwd":
            return lambda: self.forward(impl, self.x)
        x = self.x.detach().requires_grad_(True)
        params = self.trainable(impl)

        def run():
            for p in params:
                p.grad = None
            x.grad = None
            self.forward(impl, x).backward(self.grad)
        return run


@functools.lru_cache(maxsize=1)
def _peers(dtype: torch.dtype, shape: tuple[int, int, int]) -> Peers:
    return Peers(*shape, dtype)


CASES = [pytest.param(dtype, shape, mode, impl, id=f"{mode}-{_dtype_name(dtype)}-{'x'.join(map(str, shape))}-{impl}")
         for dtype in DTYPES for shape in SHAPES for mode in MODES for impl in IMPLS]


@pytest.mark.parametrize("dtype, shape, mode, impl", CASES)
def test_multi_lora(run_peer_step, benchmark, dtype, shape, mode, impl):
    if impl == "peft" and not peft_available():
        pytest.skip("peft is not installed")
    if benchmark.disabled:
        if shape != SHAPES[0]:
            pytest.skip("smoke mode runs one small shape")
        shape = SMOKE_SHAPE
    peers = _peers(dtype, shape)
    T, in_f, out_f = shape
    benchmark.group = f"{mode}-{_dtype_name(dtype)}-{T}x{in_f}x{out_f}"
    benchmark.extra_info.update(impl=impl, mode=mode, dtype=_dtype_name(dtype), T=T, in_features=in_f,
                                out_features=out_f, r=R, adapters=N_ADAPTERS, threads=torch.get_num_threads())
    run_peer_step(peers, impl, mode)


@pytest.mark.parametrize("impl", ["linear", "cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_multi_lora_gpu(run_benchmark, benchmark, shape, dtype, impl):
    """GPU forward: cuBLAS nn.Linear (the floor) vs the "cuda" and "triton" backends, 4 adapters mixed. Skipped
    without CUDA: on CPU the Triton kernel runs in its (slow) interpreter, whose speed means nothing."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; Triton on CPU runs only in its (slow) interpreter")
    T, in_f, out_f = shape
    kw = {"device": torch.device("cuda"), "dtype": dtype}
    x = torch.randn(T, in_f, **kw)
    w = torch.randn(out_f, in_f, **kw) * in_f ** -0.5
    b = torch.randn(out_f, **kw)
    a = torch.randn(N_ADAPTERS, R, in_f, **kw) * in_f ** -0.5
    bb = torch.randn(N_ADAPTERS, out_f, R, **kw)
    seg = adapter_segments((torch.arange(T, device=kw["device"]) * N_ADAPTERS) // T, N_ADAPTERS)
    s = [ALPHA / R] * N_ADAPTERS
    benchmark.group = f"gpu-fwd-{_dtype_name(dtype)}-{T}x{in_f}x{out_f}"
    benchmark.extra_info.update(impl=impl, mode="fwd", dtype=_dtype_name(dtype), T=T, r=R, adapters=N_ADAPTERS)

    def step():
        out = (torch.nn.functional.linear(x, w, b) if impl == "linear"
               else multi_lora_linear(x, w, b, a, bb, seg, s, backend=impl))
        torch.cuda.synchronize()
        return out
    with torch.inference_mode():
        run_benchmark(step)


def _interleaved(threads: int, repeats: int) -> None:
    """Time linear / peft / lowrank one call each in turn, ``repeats`` times per case; print a markdown table."""
    import time

    torch.set_num_threads(threads)
    impls = [i for i in ("linear", "peft", "lowrank") if i != "peft" or peft_available()]
    print("| mode | dtype | T×in×out | " + " | ".join(f"{i} ms" for i in impls) +
          " | peft/linear | lowrank/linear | lowrank/linear (min) |")
    print("|---|---|---|" + "---:|" * (len(impls) + 3))
    for dtype in (torch.bfloat16, torch.float32):
        for shape in SHAPES:
            peers = Peers(*shape, dtype)
            for mode in MODES:
                steps = {i: peers.step(i, mode) for i in impls}
                times: dict[str, list[float]] = {i: [] for i in impls}
                with torch.inference_mode() if mode == "fwd" else torch.enable_grad():
                    for i in impls:
                        steps[i]()
                        steps[i]()
                    for _ in range(repeats):
                        for i in impls:
                            t = time.perf_counter()
                            steps[i]()
                            times[i].append(time.perf_counter() - t)
                med = {i: sorted(v)[len(v) // 2] * 1e3 for i, v in times.items()}
                low = min(times["lowrank"]) / min(times["linear"])
                peft = f"{med['peft'] / med['linear']:.3f}" if "peft" in med else "–"
                print(f"| {mode} | {_dtype_name(dtype)} | {'×'.join(map(str, shape))} | " +
                      " | ".join(f"{med[i]:.2f}" for i in impls) +
                      f" | {peft} | {med['lowrank'] / med['linear']:.3f} | {low:.3f} |", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    _interleaved(args.threads, args.repeats)
