"""lowrank.ops.sparse_lowrank_linear (y = x·Aᵀ·Bᵀ + x·Sᵀ + b) against the dense oracle W = B·A + S.

Every backend that runs here is tested: "cpp" and "torch" always, "triton" under the interpreter on CPU
(small shapes), "cuda" where a device exists. Parity (forward and the gradients of x, A, B, s_values and bias,
under the conftest tolerance rule) covers float64/32/bf16, token counts 1, 3, 17, 33, 65, 255 (one partial,
several and padded token blocks), odd in/out, densities 0, tiny (a few entries), 1%, 5%, 50% and 100%, rank 1.
fp16 on two shapes. Also opcheck, fp64 gradcheck, torch.compile(fullgraph=True) parity, bad input, a check
that no dense [out, in] tensor is allocated in forward or backward, and the AVX2 / baseline C++ paths
(LOWRANK_MAX_CPU_ISA) in subprocesses.
"""
import pytest
import torch

import lowrank  # noqa: F401  (registers torch.ops.lowrank)
from lowrank.ops import BackendUnavailableError, SparseLayout, sparse_lowrank_linear
from lowrank.ops._backends import triton_reasons
from lowrank.reference import sltrain_linear
from lowrank.reference import sparse_lowrank_linear as reference
from tests.conftest import assert_grads_match_oracle, assert_matches_oracle

OPCHECK_OPS = {"sparse_lowrank_linear", "sparse_lowrank_linear_backward",
               "sparse_lowrank_linear_triton"}   # read by tests/test_registry.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = not triton_reasons(DEVICE)
BACKENDS = ["cpp" if DEVICE == "cpu" else "cuda", "torch"] + (["triton"] if TRITON_OK else [])
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="; ".join(triton_reasons(DEVICE)) or "triton can run")
DTYPES = (torch.float64, torch.float32, torch.bfloat16)

# (T, in, out, r, density)
SHAPES = [
    (1, 17, 3, 1, 0.5),
    (3, 1, 17, 1, 1.0),          # in = 1: every entry stored
    (17, 33, 255, 1, 0.01),      # 1%: 84 entries, most rows empty
    (255, 17, 33, 3, 0.0),       # no sparse part
    (65, 64, 40, 5, 0.001),      # tiny: 2 entries; 65 tokens = one full and one 1-token block
    (255, 255, 17, 1, 0.05),
    (33, 255, 129, 8, 0.5),
]


def _make(T, in_, out, r, density, dtype, *, bias=True, seed=0, requires_grad=False, lead=()):
    g = torch.Generator().manual_seed(T * 7919 + in_ * 31 + out + r)
    x = torch.randn(*lead, T, in_, generator=g, dtype=torch.float64)
    a = torch.randn(r, in_, generator=g, dtype=torch.float64) / in_ ** 0.5
    b = torch.randn(out, r, generator=g, dtype=torch.float64) / max(r, 1) ** 0.5
    layout = SparseLayout.random(out, in_, density, seed=seed).to(DEVICE)
    v = torch.randn(layout.nnz, generator=g, dtype=torch.float64)
    bb = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    ts = [None if t is None else t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (x, a, b, v, bb)]
    return ts[0], ts[1], ts[2], ts[3], layout, ts[4]


def _small(shape, backend):
    T, in_, out = shape[:3]
    return backend != "triton" or ((T + 15) // 16) * out <= 200     # interpreter programs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-in{}-out{}-r{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_forward_and_gradients(backend, dtype, shape):
    if not _small(shape, backend):
        pytest.skip("shape too large for the Triton interpreter")
    x, a, b, v, layout, bias = _make(*shape, dtype, requires_grad=True)
    out = sparse_lowrank_linear(x, a, b, v, layout, bias, backend=backend)

    def ref(x_, a_, b_, v_, bias_):
        return reference(x_, a_, b_, v_, layout, bias_)

    args = [x, a, b, v, bias]
    assert_matches_oracle(out, ref, args)
    g = torch.randn_like(out)
    wrt = [0, 1, 2, 3, 4]
    grads = torch.autograd.grad(out, args, g)
    assert_grads_match_oracle(grads, ref, args, g, wrt)


@pytest.mark.parametrize("shape", [(3, 17, 33, 2, 0.3), (70, 33, 65, 2, 0.05)], ids=["T3", "T70"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_float16(backend, shape):
    x, a, b, v, layout, bias = _make(*shape, torch.float16, requires_grad=True)
    out = sparse_lowrank_linear(x, a, b, v, layout, bias, backend=backend)

    def ref(x_, a_, b_, v_, bias_):
        return reference(x_, a_, b_, v_, layout, bias_)

    args = [x, a, b, v, bias]
    assert_matches_oracle(out, ref, args)
    g = torch.randn_like(out)
    assert_grads_match_oracle(torch.autograd.grad(out, args, g), ref, args, g, [0, 1, 2, 3, 4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_strided_no_bias_and_rank0(backend):
    x, a, b, v, layout, _ = _make(5, 40, 24, 2, 0.2, torch.float32, bias=False, lead=(2,))
    xs = torch.randn(2, 5, 64, device=DEVICE)[..., 3:43]                # rows strided: not contiguous
    for xx in (x, xs):
        out = sparse_lowrank_linear(xx, a, b, v, layout, backend=backend)
        assert out.shape == (2, 5, 24)
        torch.testing.assert_close(out, reference(xx, a, b, v, layout), rtol=1e-5, atol=1e-5)
    # r = 0: a pure sparse layer (what SparseAdapterLinear runs)
    a0, b0 = a[:0], b[:, :0]
    out = sparse_lowrank_linear(x, a0, b0, v, layout, backend=backend)
    torch.testing.assert_close(out, reference(x, a0, b0, v, layout), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tokens(backend):
    x, a, b, v, layout, bias = _make(1, 9, 7, 2, 0.3, torch.float32, requires_grad=True)
    x0 = torch.randn(0, 9, device=DEVICE, requires_grad=True)
    out = sparse_lowrank_linear(x0, a, b, v, layout, bias, backend=backend)
    assert out.shape == (0, 7)
    gx, ga, gv = torch.autograd.grad(out.sum(), [x0, a, v])
    assert gx.shape == (0, 9) and not ga.any() and not gv.any()


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("op", ["sparse_lowrank_linear",
                                pytest.param("sparse_lowrank_linear_triton", marks=needs_triton)])
def test_opcheck(op, requires_grad):
    x, a, b, v, layout, bias = _make(3, 17, 9, 2, 0.3, torch.float32, requires_grad=requires_grad)
    torch.library.opcheck(getattr(torch.ops.lowrank, op).default, (x, a, b, v, *layout.tensors(), bias))


def test_opcheck_backward():
    x, a, b, v, layout, _ = _make(3, 17, 9, 2, 0.3, torch.float32)
    g = torch.randn(3, 9, device=DEVICE)
    for mask in ([True, True, True, True], [False, True, False, True], [True, False, False, False]):
        torch.library.opcheck(torch.ops.lowrank.sparse_lowrank_linear_backward.default,
                              (g, x, a, b, v, *layout.tensors(), mask))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])   # triton: same backward op
def test_gradcheck_fp64(backend):
    x, a, b, v, layout, bias = _make(5, 7, 6, 2, 0.4, torch.float64, requires_grad=True)

    def f(x_, a_, b_, v_, bias_):
        return sparse_lowrank_linear(x_, a_, b_, v_, layout, bias_, backend=backend)

    assert torch.autograd.gradcheck(f, (x, a, b, v, bias))


def test_compile_fullgraph_dynamic():
    x, a, b, v, layout, bias = _make(17, 33, 21, 3, 0.1, torch.float32, requires_grad=True)

    def f(x_, a_, b_, v_, bias_):
        return sparse_lowrank_linear(x_, a_, b_, v_, layout, bias_)

    eager = f(x, a, b, v, bias)
    compiled = torch.compile(f, fullgraph=True, dynamic=True)(x, a, b, v, bias)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    g = torch.randn_like(eager)
    for e, c in zip(torch.autograd.grad(eager, [x, a, b, v, bias], g),
                    torch.autograd.grad(compiled, [x, a, b, v, bias], g)):
        torch.testing.assert_close(c, e)


def test_matches_sltrain_algorithm():
    """The dense-materializing SLTrain peer (benchmarks) computes the same layer and gradients."""
    x, a, b, v, layout, bias = _make(17, 33, 21, 3, 0.1, torch.float64, requires_grad=True)
    ours = sparse_lowrank_linear(x, a, b, v, layout, bias)
    peer = sltrain_linear(x, a, b, v, layout, bias)
    torch.testing.assert_close(ours, peer)
    g = torch.randn_like(ours)
    args = [x, a, b, v, bias]
    for o, p in zip(torch.autograd.grad(ours, args, g), torch.autograd.grad(peer, args, g)):
        torch.testing.assert_close(o, p)


def _peak_bytes(fn) -> int:
    """Largest amount of CPU memory held at once during ``fn()`` above what was allocated when it started: the
    running sum of every allocation and free the profiler's allocator hook recorded (raw, unattributed events,
    so temporaries allocated and freed inside one op count too)."""
    cpu = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[cpu], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU allocator events")
def test_no_dense_weight_allocated():
    """out·in = 4 Mi entries (16 MiB fp32) against 8 tokens: every legitimate tensor of the step (x, y, grads,
    factors, 1% values, index copies, the transposed token blocks) is below 1 MiB, so a dense [out, in] weight
    or weight gradient in forward or backward would show as a peak of 16 MiB."""
    out, in_ = 2048, 2048
    x, a, b, v, layout, bias = _make(8, in_, out, 4, 0.01, torch.float32, requires_grad=True)
    dense_bytes = out * in_ * 4

    def step():
        y = sparse_lowrank_linear(x, a, b, v, layout, bias)
        torch.autograd.grad(y.square().sum(), [x, a, b, v, bias])

    peak = _peak_bytes(step)
    assert peak < dense_bytes / 4, f"peak {peak / 2**20:.2f} MiB, dense weight {dense_bytes / 2**20:.0f} MiB"
    # The check itself sees a dense weight: the SLTrain peer forms W (and Gᵀ·X) and crosses the bound.
    assert _peak_bytes(lambda: torch.autograd.grad(sltrain_linear(x, a, b, v, layout, bias).sum(), [a])) \
        >= dense_bytes


def test_bad_input():
    x, a, b, v, layout, bias = _make(3, 8, 6, 2, 0.5, torch.float32)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] = 7 does not match s_layout.shape"):
        sparse_lowrank_linear(torch.randn(3, 7), a, b, v, layout)
    with pytest.raises(ValueError, match=r"s_values must be \[nnz=24\]"):
        sparse_lowrank_linear(x, a, b, v[:-1], layout)
    with pytest.raises(ValueError, match=r"rank r = 7 exceeds min\(in, out\) = 6"):
        sparse_lowrank_linear(x, torch.randn(7, 8), torch.randn(6, 7), v, layout)
    with pytest.raises(ValueError, match=r"lora_b must be \[out=6, r=2\]"):
        sparse_lowrank_linear(x, a, b.t(), v, layout)
    with pytest.raises(ValueError, match=r"lora_a must be \[r, in=8\]"):
        sparse_lowrank_linear(x, a[:, :5], b, v, layout)
    with pytest.raises(TypeError, match="s_values has dtype torch.float64"):
        sparse_lowrank_linear(x, a, b, v.double(), layout)
    with pytest.raises(TypeError, match="s_layout must be a lowrank.ops.SparseLayout"):
        sparse_lowrank_linear(x, a, b, v, layout.tensors())
    with pytest.raises(ValueError, match=r"bias must be \[out=6\]"):
        sparse_lowrank_linear(x, a, b, v, layout, torch.randn(5))
    with pytest.raises(TypeError, match="x must be float32"):
        sparse_lowrank_linear(x.long(), a.long(), b.long(), v.long(), layout)
    with pytest.raises(ValueError, match="s_layout is on meta"):
        sparse_lowrank_linear(x, a, b, v, layout.to("meta"))
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        sparse_lowrank_linear(x, a, b, v, layout, backend="nope")
    if DEVICE == "cpu":
        with pytest.raises(BackendUnavailableError, match="runs on cuda, not cpu"):
            sparse_lowrank_linear(x, a, b, v, layout, backend="cuda")
        # the C++ op checks on its own (direct torch.ops callers): malformed indices never reach the kernel
        rp, ci, cp, ri, pm = layout.tensors()
        bad = ci.clone()
        bad[0] = 8
        with pytest.raises(IndexError, match=r"indices must lie in \[0, 8\)"):
            torch.ops.lowrank.sparse_lowrank_linear(x, a, b, v, rp, bad, cp, ri, pm, None)
        with pytest.raises(TypeError, match="row_ptr must be int32"):
            torch.ops.lowrank.sparse_lowrank_linear(x, a, b, v, rp.long(), ci, cp, ri, pm, None)
        with pytest.raises(TypeError, match="col_idx must be int32 or uint16"):
            torch.ops.lowrank.sparse_lowrank_linear(x, a, b, v, rp, ci.long(), cp, ri, pm, None)
        with pytest.raises(ValueError, match="must be given together"):
            torch.ops.lowrank.sparse_lowrank_linear(x, a, b, v, rp, ci, rp, None, None, None)
        # int32 columns (what a CUDA layout holds) run on the CPU too
        y32 = torch.ops.lowrank.sparse_lowrank_linear(x, a, b, v, rp, ci.to(torch.int32), cp, ri, pm, None)
        torch.testing.assert_close(y32, sparse_lowrank_linear(x, a, b, v, layout))
        gy, mask = torch.randn_like(y32), [True, True, True, True]
        r16 = torch.ops.lowrank.sparse_lowrank_linear_backward(gy, x, a, b, v, rp, ci, cp, ri, pm, mask)
        r32 = torch.ops.lowrank.sparse_lowrank_linear_backward(gy, x, a, b, v, rp, ci.to(torch.int32), cp, ri, pm,
                                                               mask)
        for u, w in zip(r16, r32):
            torch.testing.assert_close(u, w)


def test_inputs_not_modified():
    x, a, b, v, layout, bias = _make(5, 9, 11, 2, 0.3, torch.float32, requires_grad=True)
    args = [x, a, b, v, bias]
    held = [t for t in layout.tensors() if t is not None]
    before = [t.detach().clone() for t in args] + [t.clone() for t in held]
    y = sparse_lowrank_linear(x, a, b, v, layout, bias)
    torch.autograd.grad(y.sum(), args)
    for t, t0 in zip(args + held, before):
        assert torch.equal(t.detach(), t0)


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ CPU kernel's threading")
@pytest.mark.parametrize("T", [64, 300], ids=["rows-parallel", "token-parallel"])
def test_threaded_backward_paths(T):
    """Enough work that two threads share it: at 64 tokens (one block) the threads split S's rows and each
    scatters g·S into its own transposed buffer, summed at the end; at 300 tokens they take whole blocks."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, a, b, v, layout, bias = _make(T, 512, 384, 4, 0.5, torch.float32, requires_grad=True)
        out = sparse_lowrank_linear(x, a, b, v, layout, bias)

        def ref(x_, a_, b_, v_, bias_):
            return reference(x_, a_, b_, v_, layout, bias_)

        args = [x, a, b, v, bias]
        assert_matches_oracle(out, ref, args)
        g = torch.randn_like(out)
        assert_grads_match_oracle(torch.autograd.grad(out, args, g, retain_graph=True), ref, args, g,
                                  [0, 1, 2, 3, 4])
        # only dx (no sampled product) and only d s_values take their own branches of the walk
        for wrt in ([0], [3]):
            grads = torch.autograd.grad(out, [args[i] for i in wrt], g, retain_graph=True)
            assert_grads_match_oracle(grads, ref, args, g, wrt)
    finally:
        torch.set_num_threads(prev)


_PORTABLE_SCRIPT = """
import torch
from lowrank.ops import SparseLayout, sparse_lowrank_linear
from lowrank.reference import sparse_lowrank_linear as reference
from tests.conftest import assert_grads_match_oracle, assert_matches_oracle
for T, in_, out, r, d in [(3, 17, 33, 2, 0.3), (17, 40, 24, 3, 0.2), (70, 33, 65, 2, 0.05)]:
    layout = SparseLayout.random(out, in_, d, seed=1)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(T)
        x, a, b, v, bias = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
                            for s in ((T, in_), (r, in_), (out, r), (layout.nnz,), (out,)))
        y = sparse_lowrank_linear(x, a, b, v, layout, bias, backend="cpp")
        ref = lambda *t: reference(*t[:4], layout, t[4])
        assert_matches_oracle(y, ref, [x, a, b, v, bias])
        go = torch.randn_like(y)
        assert_grads_match_oracle(torch.autograd.grad(y, [x, a, b, v, bias], go), ref, [x, a, b, v, bias], go,
                                  [0, 1, 2, 3, 4])
print("ok")
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU instruction-set paths")
def test_portable_cpu_paths():
    """LOWRANK_MAX_CPU_ISA caps the C++ kernels at AVX2 (the AMD CI machines) or baseline x86-64 loops, so this
    AVX-512 machine also checks the paths other CPUs take (subprocesses, both at once: the level is read once
    per process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    procs = {isa: subprocess.Popen([sys.executable, "-c", _PORTABLE_SCRIPT], cwd=root, text=True,
                                   env={**os.environ, "LOWRANK_MAX_CPU_ISA": isa, "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for isa in ("avx2", "base")}
    for isa, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip().endswith("ok"), f"{isa}: {err[-3000:]}"


def test_autocast_cpu_bf16():
    """Under torch.autocast("cpu", bf16) the op runs on bf16 casts of x, the factors, the sparse values and the bias
    (its autocast rule; the int32 support is untouched) and the gradients reach fp32 leaves."""
    gen = torch.Generator().manual_seed(7)
    layout = SparseLayout.random(16, 24, 0.1, seed=0)
    tensors = [torch.randn(*s, generator=gen) for s in ((40, 24), (4, 24), (16, 4), (layout.nnz,), (16,))]
    leaves = [t.clone().requires_grad_(True) for t in tensors]

    def run(x, a, bb, v, b):
        return sparse_lowrank_linear(x, a, bb, v, layout, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(*leaves)
    want = run(*[t.to(torch.bfloat16) for t in tensors])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
