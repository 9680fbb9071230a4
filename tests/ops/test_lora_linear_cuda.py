"""lowrank::lora_linear on CUDA (csrc/cuda/lora_linear.cu): parity with the reference, backward, opcheck.

The forward runs cuBLAS for x·Wᵀ + b and the shrink / expand-add kernels for s·(x·Aᵀ)·Bᵀ; the shapes hit the
kernels' edges: T in (1, 3, 17, 255) crosses the 16-token tile switch, r in (1, 16) plus larger ranks cross
the 16/32/64-rank tiles, in = 1000 makes the shrink split `in` across blocks, out = 70 is not a multiple of
64. Everything here needs a GPU and skips without one.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import lowrank
from lowrank.reference import lora_linear as reference
from tests.conftest import ALL_DTYPES, assert_grads_match_oracle, assert_matches_oracle

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine"),
]

TOKENS = (1, 3, 17, 255)
RANKS = (1, 16)
IN_OUT = ((67, 70), (1000, 130))
SCALING = 0.37


def make_inputs(lead, in_, out, r, dtype, bias=True):
    def t(*s):
        return torch.randn(*s, dtype=torch.float64, device="cuda").to(dtype)
    x = t(*lead, in_)
    w = t(out, in_) / math.sqrt(in_)
    b = t(out) if bias else None
    a = t(r, in_) / math.sqrt(in_)
    bb = t(out, r)
    return [x, w, b, a, bb]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("in_out", IN_OUT, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_oracle(dtype, tokens, r, in_out, bias):
    args = make_inputs((tokens,), *in_out, r, dtype, bias=bias) + [SCALING]
    y = torch.ops.lowrank.lora_linear(*args)
    assert_matches_oracle(y, reference, args)
    assert y.is_cuda


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
def test_public_op_cuda_backend(dtype, tokens):
    args = make_inputs((tokens,), 67, 70, 16, dtype) + [SCALING]
    y = lowrank.ops.lora_linear(*args, backend="cuda")
    assert_matches_oracle(y, reference, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [17, 33, 64, 100, 256])
@pytest.mark.parametrize("tokens", [1, 17])
def test_forward_large_ranks(dtype, r, tokens):
    args = make_inputs((tokens,), 300, 70, r, dtype) + [SCALING]
    assert_matches_oracle(torch.ops.lowrank.lora_linear(*args), reference, args)


@pytest.mark.parametrize("lead", [(2, 3), (3, 1, 5), (0,), (2, 0)], ids=str)
def test_forward_leading_dims_and_empty(lead):
    args = make_inputs(lead, 33, 17, 4, torch.float32) + [SCALING]
    y = torch.ops.lowrank.lora_linear(*args)
    assert y.shape == (*lead, 17)
    assert_matches_oracle(y, reference, args)


def test_forward_non_contiguous_inputs():
    x = torch.randn(40, 9, device="cuda").t()               # [9, 40] with column stride 9
    w = torch.randn(23, 40, device="cuda") / math.sqrt(40)
    a = torch.randn(40, 5, device="cuda").t() / math.sqrt(40)  # [5, 40] transposed view
    bb = torch.randn(46, 5, device="cuda")[::2]               # [23, 5] with row stride 10
    args = [x, w, None, a, bb, SCALING]
    assert_matches_oracle(torch.ops.lowrank.lora_linear(*args), reference, args)


def test_forward_zero_scaling_is_base_linear():
    x, w, b, a, bb = make_inputs((5,), 33, 17, 4, torch.float32)
    y = torch.ops.lowrank.lora_linear(x, w, b, a, bb, 0.0)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))


def test_forward_is_deterministic():
    args = make_inputs((3,), 4000, 70, 16, torch.bfloat16) + [SCALING]
    y1 = torch.ops.lowrank.lora_linear(*args)
    y2 = torch.ops.lowrank.lora_linear(*args)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("r", RANKS)
def test_backward_matches_oracle(dtype, tokens, r):
    args = make_inputs((tokens,), 67, 70, r, dtype) + [1.5]
    leaves = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    y = lowrank.ops.lora_linear(*leaves, backend="cuda")
    g = torch.randn_like(y)
    wrt = [0, 1, 2, 3, 4]
    grads = torch.autograd.grad(y, [leaves[i] for i in wrt], g)
    assert_grads_match_oracle(grads, reference, args, g, wrt)


@pytest.mark.parametrize("mask", [[True, True, True, True], [False, False, True, True],
                                  [True, False, False, False], [False, False, False, False]])
def test_backward_op_output_mask(mask):
    x, w, _, a, bb = make_inputs((4,), 33, 17, 3, torch.float32)
    g = torch.randn(4, 17, device="cuda")
    out = torch.ops.lowrank.lora_linear_backward(g, x, w, a, bb, 0.5, mask)
    for grad, wanted, ref in zip(out, mask, (x, w, a, bb)):
        if wanted:
            assert grad is not None and grad.shape == ref.shape and grad.is_cuda
        else:
            assert grad is None


def test_mixed_devices_are_refused():
    x, w, b, a, bb = make_inputs((3,), 8, 5, 2, torch.float32)
    with pytest.raises(ValueError, match="is on"):
        torch.ops.lowrank.lora_linear(x, w.cpu(), b, a, bb, 1.0)


@pytest.mark.parametrize(("dtype", "requires_grad"), [
    (torch.float32, False), (torch.float64, False), (torch.bfloat16, False), (torch.float16, False),
    (torch.float32, True), (torch.float64, True)], ids=str)
def test_opcheck_forward(dtype, requires_grad):
    args = [t.requires_grad_(requires_grad) for t in make_inputs((2, 3), 17, 5, 3, dtype)]
    opcheck(torch.ops.lowrank.lora_linear.default, (*args, 0.5))
    opcheck(torch.ops.lowrank.lora_linear.default, (args[0], args[1], None, args[3], args[4], 2.0))


@pytest.mark.parametrize("mask", [[True, True, True, True], [True, False, True, True],
                                  [False, False, True, False], [False, False, False, False]])
def test_opcheck_backward(mask):
    x, w, _, a, bb = make_inputs((2, 3), 17, 5, 3, torch.float64)
    g = torch.randn(2, 3, 5, dtype=torch.float64, device="cuda")
    opcheck(torch.ops.lowrank.lora_linear_backward.default, (g, x, w, a, bb, 0.5, mask))


def test_gradcheck_fp64():
    args = [t.requires_grad_(True) for t in make_inputs((2, 3), 5, 4, 2, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: lowrank.ops.lora_linear(*a, 0.7, backend="cuda"), tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_parity(dtype):
    torch._dynamo.reset()
    f = torch.compile(lambda *a: lowrank.ops.lora_linear(*a, SCALING, backend="cuda"), fullgraph=True,
                      dynamic=True)
    for tokens in (3, 17):
        args = make_inputs((tokens,), 33, 9, 4, dtype)
        assert_matches_oracle(f(*args), lambda *a: reference(*a, SCALING), args)
