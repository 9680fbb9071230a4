"""lowrank.ops.bf16x3_linear (fp32 linear from bf16 halves) against its reference and against fp32 F.linear.

Backends: "cpp" where the CPU has AMX tiles (skipped with the reason elsewhere), "torch" always, "triton" under the
interpreter (small shapes). Parity with the reference follows the conftest tolerance rule (the reference's own
fp32 summation error, doubled); closeness to fp32 F.linear is checked elementwise against the split's error bound.
The op is float32 only (it exists to emulate fp32), so there is no fp64 gradcheck of the op; its backward is the
fp32 linear's, checked against F.linear's autograd and by gradcheck of that formula in fp64.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lowrank  # noqa: F401  (registers torch.ops.lowrank)
from lowrank.ops import BackendUnavailableError, bf16x3_linear, pack_bf16x3
from lowrank.ops._backends import cpu_isa, triton_reasons
from lowrank.reference import bf16x3_linear as reference
from lowrank.reference.bf16x3_linear import bf16_halves
from tests.conftest import assert_matches_oracle

OPCHECK_OPS = {"bf16x3_linear", "bf16x3_linear_triton", "bf16x3_pack", "cpu_isa"}   # read by tests/test_registry.py

AMX = cpu_isa() == "amx"
TRITON_OK = not triton_reasons("cpu")
BACKENDS = (["cpp"] if AMX else []) + ["torch"] + (["triton"] if TRITON_OK else [])
needs_amx = pytest.mark.skipif(not AMX, reason=f"the CPU kernel needs AMX tiles; this CPU's level is {cpu_isa()!r}")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="; ".join(triton_reasons("cpu")) or "triton can run")

# (T, in, out): T in {1, 3, 17, 255}, odd in/out, tile edges (16-feature and 32-input tiles, 32-row blocks).
SHAPES = [(1, 1, 1), (3, 17, 5), (17, 255, 33), (255, 3, 17), (33, 64, 48), (255, 384, 130), (300, 700, 64)]


def _make(T, K, N, bias=True, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + T * 7919 + K * 31 + N)
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return [x, w, b]


def _small(shape, backend):
    return backend != "triton" or shape[0] * shape[2] <= 17 * 33


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-in{}-out{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity(backend, shape, bias):
    if not _small(shape, backend):
        pytest.skip("shape too large for the Triton interpreter")
    args = _make(*shape, bias)
    out = bf16x3_linear(*args, backend=backend)
    assert_matches_oracle(out, reference, args)


@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 255, 33), (255, 384, 130)], ids=lambda s: "T{}-in{}-out{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_epilogue(backend, shape):
    if not _small(shape, backend):
        pytest.skip("shape too large for the Triton interpreter")
    x, w, b = _make(*shape, seed=3)
    x = x * 3                                          # pre-activations over GELU's curved range
    out = bf16x3_linear(x, w, b, activation="gelu", backend=backend)
    assert_matches_oracle(out, lambda *a: reference(*a, activation="gelu"), [x, w, b])
    # and against plain fp32 F.gelu(F.linear): the split's error only
    torch.testing.assert_close(out, F.gelu(F.linear(x, w, b)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 100, 33), (255, 384, 40)], ids=lambda s: "T{}-in{}-H{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_epilogue(backend, bias, shape):
    T, K, H = shape
    if not _small((T, K, 2 * H), backend):
        pytest.skip("shape too large for the Triton interpreter")
    x, w, b = _make(T, K, 2 * H, bias, seed=5)
    x = x * 3
    out = bf16x3_linear(x, w, b, activation="swiglu", backend=backend)
    assert out.shape == (T, H)
    assert_matches_oracle(out, lambda *a: reference(*a, activation="swiglu"), [x, w, b])
    z = F.linear(x, w, b)
    # against plain fp32: the split's error, relative to the output's scale (silu(g)·u multiplies two errors' scales)
    torch.testing.assert_close(out, F.silu(z[:, :H]) * z[:, H:], rtol=1e-4, atol=2e-5 * max(1.0, z.abs().max().item() ** 2))
    if backend == "cpp":
        p = pack_bf16x3(w, gated=True)
        assert p.shape == (2 * ((H + 15) // 16), (K + 31) // 32, 2, 16, 32)
        assert torch.equal(bf16x3_linear(x, w, b, packed=p, activation="swiglu", backend=backend), out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_gradients(backend):
    x, w, b = _make(17, 33, 40, requires_grad=True, seed=6)
    out = bf16x3_linear(x, w, b, activation="swiglu", backend=backend)
    g = torch.randn_like(out)
    z = F.linear(x, w, b)
    want = torch.autograd.grad(F.silu(z[:, :20]) * z[:, 20:], [x, w, b], g)
    for a, c in zip(torch.autograd.grad(out, [x, w, b], g), want):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_gradients(backend):
    x, w, b = _make(17, 33, 20, requires_grad=True, seed=4)
    out = bf16x3_linear(x, w, b, activation="gelu", backend=backend)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w, b], g)
    want = torch.autograd.grad(F.gelu(F.linear(x, w, b)), [x, w, b], g)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_to_fp32_linear(backend):
    # |x·Wᵀ − bf16x3| ≤ Σ_k |x_k w_k| · 3·2⁻¹⁷ (x_lo, W_lo and the dropped x_lo·W_lo) + fp32 summation
    x, w, b = _make(17, 255, 33, seed=1)
    out = bf16x3_linear(x, w, b, backend=backend).double()
    exact = x.double() @ w.double().T + b.double()
    bound = (x.double().abs() @ w.double().abs().T) * (3 * 2.0 ** -17 + 255 * 2.0 ** -24) + 1e-7
    assert ((out - exact).abs() <= bound).all()
    # and far closer than plain bf16
    bf16 = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).double()
    assert (out - exact).abs().max() < (bf16 - exact).abs().max() / 100


def test_halves():
    v = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    hi, lo = bf16_halves(v)
    assert torch.equal(hi, hi.bfloat16().float()) and torch.equal(lo, lo.bfloat16().float())
    assert ((v - hi - lo).abs() <= v.abs() * 2.0 ** -17).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_strided_and_empty(backend):
    big = torch.randn(2, 5, 40)
    x = big[:, 1:4, 3:20]                       # [2, 3, 17], rows 40 apart
    w, b = torch.randn(9, 17), torch.randn(9)
    out = bf16x3_linear(x, w, b, backend=backend)
    assert out.shape == (2, 3, 9)
    torch.testing.assert_close(out, reference(x, w, b), rtol=1e-5, atol=1e-5)
    assert bf16x3_linear(torch.randn(0, 17), w, b, backend=backend).shape == (0, 9)
    assert bf16x3_linear(torch.randn(4, 0, 17), w, backend=backend).shape == (4, 0, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_stay_non_finite(backend):
    x, w, b = _make(3, 40, 20)
    x = x.detach().clone()
    x[0, 5], x[1, 7], x[2, 0] = float("inf"), float("nan"), 1e30
    out = bf16x3_linear(x, w, b, backend=backend)
    ref = F.linear(x, w, b)
    # the rows with inf / NaN are non-finite (NaN where inf·W_lo meets the opposite sign or 0), the large row is not
    assert not out[:2].isfinite().any() and not ref[:2].isfinite().any()
    torch.testing.assert_close(out[2], ref[2], rtol=1e-4, atol=0)


@needs_amx
def test_packed_weight_matches_packing_in_the_call():
    x, w, b = _make(70, 100, 40)
    p = pack_bf16x3(w)
    assert p.shape == (3, 4, 2, 16, 32) and p.dtype == torch.bfloat16
    hi, lo = bf16_halves(w)
    # W[n, k] sits at [n // 16, k // 32, part, (k % 32) // 2, 2 * (n % 16) + k % 2]
    n, k = 37, 77
    assert p[n // 16, k // 32, 0, (k % 32) // 2, 2 * (n % 16) + k % 2].float() == hi[n, k]
    assert p[n // 16, k // 32, 1, (k % 32) // 2, 2 * (n % 16) + k % 2].float() == lo[n, k]
    assert torch.equal(bf16x3_linear(x, w, b, packed=p, backend="cpp"), bf16x3_linear(x, w, b, backend="cpp"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_the_fp32_linears(backend):
    x, w, b = _make(17, 33, 20, requires_grad=True)
    out = bf16x3_linear(x, w, b, backend=backend)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w, b], g)
    want = torch.autograd.grad(F.linear(x, w, b), [x, w, b], g)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_gradcheck_of_the_backward_formula_fp64():
    from lowrank.ops.bf16x3_linear import _backward

    x, w, b = (t.double().detach().requires_grad_() for t in _make(3, 5, 4))

    class Ctx:
        saved_tensors = (x, w, None)
        has_bias = True
        activation = "none"
        needs_input_grad = (True, True, True, False, False)

    g = torch.randn(3, 4, dtype=torch.float64)
    dx, dw, db, _, _ = _backward(Ctx, g)
    want = torch.autograd.grad(F.linear(x, w, b), [x, w, b], g)
    for a, c in zip((dx, dw, db), want):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda gg: _backward(Ctx, gg)[0], (g.requires_grad_(),))


OPS = [pytest.param("bf16x3_linear", marks=needs_amx), pytest.param("bf16x3_linear_triton", marks=needs_triton)]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, bias, requires_grad):
    args = _make(3, 17, 5, bias, requires_grad=requires_grad)
    if op == "bf16x3_linear":
        args.append(pack_bf16x3(args[1].detach()))
    for act in ("none", "gelu", "swiglu"):
        a = list(args)
        if act == "swiglu" and op == "bf16x3_linear":
            a[-1] = pack_bf16x3(args[1].detach()[:4], gated=True)
        if act == "swiglu":
            a[1] = a[1][:4]
            a[2] = None if a[2] is None else a[2][:4]
        torch.library.opcheck(getattr(torch.ops.lowrank, op).default, (*a, act))


@needs_amx
def test_opcheck_pack_and_isa():
    torch.library.opcheck(torch.ops.lowrank.bf16x3_pack.default, (torch.randn(17, 40),))
    torch.library.opcheck(torch.ops.lowrank.bf16x3_pack.default, (torch.randn(18, 40), True))
    assert torch.ops.lowrank.cpu_isa() in ("base", "avx2", "avx512", "avx512_bf16", "amx")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(dynamic):
    x, w, b = _make(17, 33, 20, requires_grad=True)
    p = pack_bf16x3(w.detach()) if AMX else None

    def f(xx, ww, bb):
        return bf16x3_linear(xx, ww, bb, packed=p)

    eager = f(x, w, b)
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)(x, w, b)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    g = torch.randn_like(eager)
    for a, c in zip(torch.autograd.grad(eager, [x, w, b], g), torch.autograd.grad(compiled, [x, w, b], g)):
        torch.testing.assert_close(c, a)


def test_bad_input():
    x, w, b = torch.randn(3, 8), torch.randn(10, 8), torch.randn(10)
    with pytest.raises(TypeError, match="x must be float32"):
        bf16x3_linear(x.bfloat16(), w)
    with pytest.raises(TypeError, match="weight must be float32"):
        bf16x3_linear(x, w.double())
    with pytest.raises(TypeError, match="bias must be float32"):
        bf16x3_linear(x, w, b.half())
    with pytest.raises(ValueError, match=r"x.shape\[-1\] = 7 does not match weight \[out=10, in=8\]"):
        bf16x3_linear(torch.randn(3, 7), w)
    with pytest.raises(ValueError, match=r"bias must be \[out=10\]"):
        bf16x3_linear(x, w, torch.randn(9))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        bf16x3_linear(x, w[None])
    with pytest.raises(ValueError, match="0-D"):
        bf16x3_linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match="weight is on meta"):
        bf16x3_linear(x, w.to("meta"))
    with pytest.raises(ValueError, match=r"packed must be pack_bf16x3\(weight, gated=False\)"):
        bf16x3_linear(x, w, packed=torch.zeros(2, 1, 2, 16, 32, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bf16x3_linear([1.0], w)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        bf16x3_linear(x, w, backend="cuda")
    with pytest.raises(ValueError, match=r"activation must be one of \('none', 'gelu', 'swiglu'\)"):
        bf16x3_linear(x, w, activation="tanh")
    with pytest.raises(ValueError, match="pack_bf16x3: weight must be a 2-D float32 CPU tensor"):
        pack_bf16x3(w.double())
    with pytest.raises(ValueError, match="'swiglu' needs weight = \\[gate; up\\] with an even number of rows"):
        bf16x3_linear(x, w[:9], activation="swiglu")
    with pytest.raises(ValueError, match="gated weight stacks gate and up rows"):
        pack_bf16x3(w[:9], gated=True)
    if AMX:  # the C++ op checks on its own too (direct torch.ops callers)
        with pytest.raises(ValueError, match="packed must be the contiguous bf16"):
            torch.ops.lowrank.bf16x3_linear(x, w, None, torch.zeros(3, dtype=torch.bfloat16), "none")
        with pytest.raises(ValueError, match="activation must be 'none', 'gelu' or 'swiglu'"):
            torch.ops.lowrank.bf16x3_linear(x, w, None, None, "relu")
        with pytest.raises(ValueError, match="'swiglu' needs weight"):
            torch.ops.lowrank.bf16x3_linear(x, w[:9], None, None, "swiglu")


def test_cpp_refused_without_amx_says_why():
    code = ("import torch, lowrank\nfrom lowrank.ops import bf16x3_linear\n"
            "try:\n    bf16x3_linear(torch.randn(2, 3), torch.randn(4, 3), backend='cpp')\n"
            "except lowrank.BackendUnavailableError as e:\n    print('REFUSED', e)\n"
            "print('AUTO', bf16x3_linear(torch.randn(2, 3), torch.randn(4, 3)).shape)\n")
    env = {"LOWRANK_MAX_CPU_ISA": "avx512_bf16", "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "REFUSED" in out.stdout and "AMX-BF16 tiles" in out.stdout, out.stdout + out.stderr
    assert "AUTO torch.Size([2, 4])" in out.stdout


def test_inputs_not_modified():
    args = _make(5, 9, 11)
    before = [a.clone() for a in args]
    bf16x3_linear(*args)
    for a, c in zip(args, before):
        assert torch.equal(a, c)


def test_backend_error_lists_reasons():
    if AMX:
        pytest.skip("this CPU has AMX: the refusal is tested in a subprocess with LOWRANK_MAX_CPU_ISA")
    with pytest.raises(BackendUnavailableError, match="AMX-BF16"):
        bf16x3_linear(torch.randn(2, 3), torch.randn(4, 3), backend="cpp")


def test_auto_never_picks_the_triton_interpreter_on_cpu():
    """Without AMX the C++ kernel refuses; "auto" then takes the torch backend, not Triton (which on CPU tensors is
    its interpreter, a testing aid), even with TRITON_INTERPRET=1; backend="triton" still runs it."""
    from lowrank.ops._backends import select
    from lowrank.ops.bf16x3_linear import BACKENDS

    chosen = select("bf16x3_linear", BACKENDS, "auto", torch.device("cpu"), torch.float32).name
    assert chosen == ("cpp" if AMX else "torch")
    with pytest.raises(BackendUnavailableError, match="never picks Triton for CPU tensors"):
        select("bf16x3_linear", [b for b in BACKENDS if b.name == "triton"], "auto", torch.device("cpu"),
               torch.float32)


def test_round_to_bf16_is_the_cast_bit_for_bit():
    """The reference rounds on the bit pattern (torch.compile folds a cast down and back up into a no-op); it must
    equal ``v.to(bfloat16).float()`` everywhere: random bit patterns (NaNs, infinities, subnormals included),
    ties, values that round up to infinity."""
    from lowrank.reference.bf16x3_linear import round_to_bf16

    gen = torch.Generator().manual_seed(5)
    v = torch.cat([torch.randint(-2 ** 31, 2 ** 31 - 1, (200_000,), dtype=torch.int32, generator=gen)
                   .view(torch.float32),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.3895e38, 3.4e38, -3.4e38,
                                 1e-40, -1e-41, 1.00390625, 1.01171875, 1.0000001])])
    got, want = round_to_bf16(v), v.to(torch.bfloat16).float()
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), v[~same][:5]
    compiled = torch.compile(round_to_bf16, fullgraph=True)(v)
    assert bool(((compiled.view(torch.int32) == want.view(torch.int32)) | (compiled.isnan() & want.isnan())).all())
