"""Sparse-plus-low-rank linear (``lowrank.ops.sparse_lowrank_linear``) against SLTrain's dense algorithm.

Per group ``f"{dtype}-{mode}-T{T}-out{out}-in{in}-r{r}-d{density}"`` (mode "fwd" or "fwdbwd"):
  * "sltrain": SLTrain's algorithm (lowrank.reference.sltrain_linear): forms W = B·A + S, a dense GEMM; the
    backward forms W again and the dense weight gradient Gᵀ·X [out, in], then projects it: the peer.
  * "linear": plain ``nn.Linear`` of the same shape (the dense layer's cost; its backward includes dW).
  * "lowrank": the C++ kernels (rank-r GEMMs + CSR/CSC sparse products, no [out, in] tensor).
  * "floor": the rank-r GEMMs alone (the same op with an empty support): lowrank minus its sparse work.
Each case also records, in ``extra_info["peak_bytes"]``, the largest memory held at once during one call
beyond its inputs (the profiler's allocator events; outputs and gradients included), and the layout's index
bytes.
Shapes (issue 6): W 4096×4096 and 1024×4096 ([out, in]), rank 128, density 1% / 3% / 5%, 2048 tokens, fp32 and
bf16. Under ``--benchmark-disable`` (CI) each case runs once on a small shape.

    pytest benchmarks/bench_sparse_lowrank_linear.py --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
from __future__ import annotations

import functools

import pytest
import torch

from lowrank.ops import SparseLayout, sparse_lowrank_linear
from lowrank.reference import sltrain_linear

BENCHMARKED_OPS = {"sparse_lowrank_linear", "sparse_lowrank_linear_backward",
                   "sparse_lowrank_linear_triton"}   # read by tests/test_registry.py

SHAPES = ((2048, 4096, 4096, 128), (2048, 1024, 4096, 128))     # (T, out, in, r)
DENSITIES = (0.01, 0.03, 0.05)
DTYPES = (torch.float32, torch.bfloat16)
MODES = ("fwd", "fwdbwd")
IMPLS = ("sltrain", "linear", "lowrank", "floor")
SMOKE_SHAPE = (33, 48, 64, 8)


def _name(dtype):
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=2)
def _inputs(dtype, shape, density):
    T, out, in_, r = shape
    g = torch.Generator().manual_seed(0)
    layout = SparseLayout.random(out, in_, density, seed=0)
    x = torch.randn(T, in_, generator=g).to(dtype)
    a = (torch.randn(r, in_, generator=g) * in_ ** -0.5).to(dtype)
    b = (torch.randn(out, r, generator=g) * r ** -0.5).to(dtype)
    v = (torch.randn(layout.nnz, generator=g) * in_ ** -0.5).to(dtype)
    bias = torch.randn(out, generator=g).to(dtype)
    grad = torch.randn(T, out, generator=g).to(dtype)
    return x, a, b, v, layout, bias, grad


def peak_bytes(fn) -> int:
    """Largest memory held at once during ``fn()`` above what was held when it started (allocator events)."""
    cpu = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[cpu], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def make_call(impl, mode, x, a, b, v, layout, bias, grad):
    """The timed callable: one forward (no autograd graph), or forward + backward (x, A, B, values, bias)."""
    out_features, in_features = layout.shape
    if impl == "linear":
        lin = torch.nn.Linear(in_features, out_features, dtype=x.dtype)
        params = [lin.weight, lin.bias]
        fn = lin
    else:
        if impl == "floor":
            layout = SparseLayout.random(out_features, in_features, 0.0)
            v = v[:0]
        params = [a, b, v, bias]
        op = sltrain_linear if impl == "sltrain" else sparse_lowrank_linear

        def fn(x_):
            return op(x_, *params[:3], layout, params[3])
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(x)
        return call
    xs = x.detach().requires_grad_(True)
    if impl == "linear":
        ps = params                      # the module's own parameters (require grad)
    else:
        ps = [p.detach().requires_grad_(True) for p in params]
        params[:] = ps

    def call():
        y = fn(xs)
        return torch.autograd.grad(y, [xs, *ps], grad)
    return call


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-out{}-in{}-r{}".format(*s))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_sparse_lowrank_linear(run_benchmark, benchmark, dtype, mode, shape, density, impl):
    if impl == "linear" and density != DENSITIES[0] and not benchmark.disabled:
        pytest.skip("nn.Linear does not depend on the density: timed once per shape")
    shape = SMOKE_SHAPE if benchmark.disabled else shape
    x, a, b, v, layout, bias, grad = _inputs(dtype, shape, density)
    benchmark.group = f"{_name(dtype)}-{mode}-" + "T{}-out{}-in{}-r{}".format(*shape) + f"-d{density}"
    call = make_call(impl, mode, x, a, b, v, layout, bias, grad)
    info = dict(impl=impl, dtype=_name(dtype), mode=mode, T=shape[0], out=shape[1], **{"in": shape[2]},
                r=shape[3], density=density, nnz=layout.nnz, index_bytes=layout.index_bytes(),
                int64_flat_index_bytes=8 * layout.nnz)
    # The call's output activations (y, and dx for fwdbwd): subtracted from the peak to compare transients.
    widths = shape[1] + (shape[2] if mode == "fwdbwd" else 0)
    info["activation_bytes"] = x.element_size() * shape[0] * widths
    if not benchmark.disabled:
        info["peak_bytes"] = peak_bytes(call)
    benchmark.extra_info.update(info)
    result = run_benchmark(call)
    if impl in ("lowrank", "sltrain"):
        # Same layer: check the forward output of the timed implementation against the other one.
        with torch.no_grad():
            y = sparse_lowrank_linear(x, a, b, v, layout, bias) if impl == "sltrain" else \
                sltrain_linear(x, a, b, v, layout, bias)
        got = result if mode == "fwd" else sparse_lowrank_linear(x, a, b, v, layout, bias)
        scale = y.float().abs().max().item()
        torch.testing.assert_close(got.float(), y.float(), rtol=5e-2, atol=5e-2 * scale)


def ratio_table(path: str) -> str:
    """Markdown table from a ``--benchmark-json`` file: medians, speed-ups over SLTrain and nn.Linear,
    transient memory ratios (peak minus the output activations y, dx), and the sparse part's effective rate:
    2·T·nnz flops forward (3× that forward + backward: x·Sᵀ, g·S, the sampled product) over the time
    lowrank takes beyond the floor."""
    import json

    rows: dict[tuple, dict] = {}
    for bench in json.load(open(path))["benchmarks"]:
        info = bench["extra_info"]
        key = (info["dtype"], info["mode"], info["out"], info["in"], info["T"], info["r"], info["density"])
        rows.setdefault(key, {})[info["impl"]] = (bench["stats"]["median"], info.get("peak_bytes"), info)
    linear = {k[:6]: v["linear"] for k, v in rows.items() if "linear" in v}
    lines = ["| dtype | mode | W out×in | density | lowrank ms | SLTrain ms | speed-up | nn.Linear ms | "
             "floor ms | sparse GFLOP/s | transient memory lowrank / SLTrain | "
             "index bytes / int64 flat |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in sorted(rows.items()):
        if "lowrank" not in v or "sltrain" not in v:
            continue
        dtype, mode, out, in_, T, r, d = key
        (ours, p_ours, info), (ref, p_ref, _) = v["lowrank"], v["sltrain"]
        lin = linear.get(key[:6], (float("nan"), None, None))[0]
        floor = v.get("floor", (float("nan"),))[0]
        flops = 2 * T * info["nnz"] * (1 if mode == "fwd" else 3)
        rate = flops / (ours - floor) / 1e9 if ours > floor else float("nan")
        act = info["activation_bytes"]
        mem = f"{(p_ours - act) / (p_ref - act):.2f}" if p_ours and p_ref else "–"
        idx = info["index_bytes"] / info["int64_flat_index_bytes"] if info["nnz"] else float("nan")
        lines.append(f"| {dtype} | {mode} | {out}×{in_} | {d:.0%} | {ours * 1e3:.1f} | {ref * 1e3:.1f} | "
                     f"{ref / ours:.2f}× | {lin * 1e3:.1f} | {floor * 1e3:.1f} | {rate:.0f} | {mem} | "
                     f"{idx:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(ratio_table(sys.argv[1]))
