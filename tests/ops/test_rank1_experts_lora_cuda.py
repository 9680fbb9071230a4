"""lowrank.ops.rank1_experts_lora(..., backend="cuda"): parity with the reference on a GPU (skipped without one;
tests/build compiles the kernels with nvcc everywhere)."""
import pytest
import torch

from lowrank.ops import rank1_experts_lora
from lowrank.reference import rank1_experts_lora as reference
from tests.conftest import assert_grads_match_oracle
from tests.ops.test_rank1_experts_lora import check_forward, make_inputs

pytestmark = pytest.mark.cuda

SHAPES = [((1,), 5, 3, 1, 1), ((3,), 17, 9, 4, 4), ((255,), 40, 70, 16, 3), ((2, 9), 65, 300, 64, 8)]


def _cuda(args, kw):
    return ([a.cuda() if a is not None else None for a in args],
            {n: v.cuda() if isinstance(v, torch.Tensor) else v for n, v in kw.items()})


@pytest.mark.parametrize("gate", ["router", "self"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_parity(dtype, shape, gate):
    lead, in_, out, E, k = shape
    args, kw = _cuda(*make_inputs(lead, in_, out, E, dtype, gate, router_bias=gate == "router"))
    check_forward(args, kw, k, "cuda", scaling=0.7, **({"threshold": 0.05} if gate == "self" else {}))


@pytest.mark.parametrize("gate", ["router", "self"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backward_parity(dtype, gate):
    args, kw = make_inputs((33,), 24, 20, 8, dtype, gate)
    full = [a.cuda() for a in args + ([kw["router"]] if gate == "router" else [])]
    leaves = [a.detach().requires_grad_(True) for a in full]
    y, _, _ = rank1_experts_lora(*leaves[:5], 3, scaling=0.5, gate=gate, backend="cuda",
                                 **({"router": leaves[5]} if gate == "router" else {}))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)

    def fn(*a):
        return reference(*a[:5], 3, scaling=0.5, gate=gate, **({"router": a[5]} if gate == "router" else {}))[0]
    assert_grads_match_oracle(grads, fn, full, g, list(range(len(full))))
