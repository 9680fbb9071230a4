"""lowrank.ops.lora_linear(..., backend="triton") against the reference, under the conftest tolerance rule.

On a machine without CUDA the kernels run on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported), which is slow: shapes stay tiny and the shape grid is a covering
sample rather than a full product. The refusal message when triton cannot run is tested with the backend table.
"""
import pytest
import torch

import lowrank  # noqa: F401  (registers torch.ops.lowrank)
from lowrank.ops import lora_linear
from lowrank.ops._backends import triton_reasons
from lowrank.reference.lora_linear import lora_linear as reference
from tests.conftest import ALL_DTYPES, assert_grads_match_oracle, assert_matches_oracle

OPCHECK_OPS = {"lora_linear_triton"}   # read by tests/test_registry.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASONS = triton_reasons(DEVICE)
pytestmark = pytest.mark.skipif(bool(_REASONS), reason="; ".join(_REASONS) or "triton can run")

if not _REASONS:
    from lowrank.kernels.triton.lora_linear import lora_linear_triton

# (T, in, out, r): every T in {1, 3, 17}, in/out in {1, 3, 17, 33} and r in {1, 3, 16} appears, including r > in.
SHAPES = [(1, 1, 1, 1), (3, 17, 33, 3), (17, 33, 17, 16), (1, 33, 3, 1), (3, 3, 1, 16), (17, 1, 33, 3),
          (3, 33, 33, 1), (17, 17, 3, 1)]
SCALING = 1 / 3   # not a dyadic fraction, so a scaling rounded to fp32 shows up in the fp64 comparison


def _make(lead, in_, out, r, dtype, bias=True, requires_grad=False):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(requires_grad)
    return [t(*lead, in_), t(out, in_), t(out) if bias else None, t(r, in_), t(out, r), SCALING]


def _check(args, wrt=None):
    """Forward parity, then gradient parity w.r.t. the tensor arguments (all of them by default)."""
    if wrt is None:
        wrt = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    leaves = [a.detach().requires_grad_(i in wrt) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    out = lora_linear(*leaves, backend="triton")
    assert_matches_oracle(out, reference, args)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [leaves[i] for i in wrt], grad_out)
    assert_grads_match_oracle(grads, reference, args, grad_out, wrt)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-in{}-out{}-r{}".format(*s))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_parity(dtype, shape, bias):
    T, in_, out, r = shape
    _check(_make((T,), in_, out, r, dtype, bias))


@pytest.mark.parametrize("lead", [(2, 3), (2, 1, 3)], ids=["3d", "4d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_leading_dims(dtype, lead):
    _check(_make(lead, 17, 3, 3, dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_non_contiguous(dtype):
    base = torch.randn(3, 4, 2 * 17, dtype=dtype, device=DEVICE)
    x = base.transpose(0, 1)[..., ::2]              # [4, 3, 17]: leading dims not flattenable, inner stride 2
    x2d = base[0, :, ::2]                           # [4, 17]: flattened as a strided view, no copy
    weight = torch.randn(17, 33, dtype=dtype, device=DEVICE).t()          # [33, 17] column-major
    lora_a = torch.randn(17, 3, dtype=dtype, device=DEVICE).t()           # [3, 17]
    lora_b = torch.randn(6, 33, dtype=dtype, device=DEVICE)[::2].t()      # [33, 3], both strides non-unit
    bias = torch.randn(1, dtype=dtype, device=DEVICE).expand(33)          # stride 0
    assert not x.is_contiguous() and not weight.is_contiguous() and not lora_b.is_contiguous()
    _check([x, weight, bias, lora_a, lora_b, SCALING])
    _check([x2d, weight, bias, lora_a, lora_b, SCALING])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_tile_loops(dtype):
    # 16-wide blocks on 33 × 40 × 35 × r=40: three M and N tiles, three K and rank iterations, a partial group.
    x, weight, bias, lora_a, lora_b, s = args = _make((33,), 40, 35, 40, dtype)
    blocks = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16, "GROUP_M": 2}
    assert_matches_oracle(lora_linear_triton(x, weight, bias, lora_a, lora_b, s, blocks=blocks), reference, args)


def test_rank_256():
    _check(_make((3,), 3, 3, 256, torch.float32))


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["T0", "2x0"])
def test_zero_tokens(lead):
    args = _make(lead, 17, 3, 3, torch.float32, requires_grad=True)
    out = lora_linear(*args, backend="triton")
    assert out.shape == (*lead, 3)
    out.sum().backward()
    assert args[0].grad.shape == args[0].shape
    assert torch.equal(args[1].grad, torch.zeros_like(args[1]))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(bias, requires_grad):
    args = _make((2, 3), 17, 5, 3, torch.float32, bias, requires_grad)
    torch.library.opcheck(torch.ops.lowrank.lora_linear_triton.default, tuple(args))


def test_gradcheck_fp64():
    args = _make((2,), 3, 4, 2, torch.float64, requires_grad=True)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def f(x, weight, bias, lora_a, lora_b):
        return lora_linear(x, weight, bias, lora_a, lora_b, SCALING, backend="triton")

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(dynamic):
    args = _make((2, 3), 17, 5, 3, torch.float32, requires_grad=True)
    wrt = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def f(x, weight, bias, lora_a, lora_b, s):
        return lora_linear(x, weight, bias, lora_a, lora_b, s, backend="triton")

    eager = f(*args)                                  # also performs the lazy kernel-module import
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)(*args)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)   # the same kernel runs in both
    grad_out = torch.randn_like(eager)
    grads = torch.autograd.grad(compiled, [args[i] for i in wrt], grad_out)
    assert_grads_match_oracle(grads, reference, args, grad_out, wrt)
