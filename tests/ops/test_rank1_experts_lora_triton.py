"""lowrank.ops.rank1_experts_lora(..., backend="triton") against the reference.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (conftest sets TRITON_INTERPRET=1), which
is slow: shapes stay tiny and the grid is a covering sample (T in {1, 3, 17}, E = 1, k = 1, k = E, both gates).
"""
import pytest
import torch
from torch.library import opcheck

import lowrank  # noqa: F401  (registers torch.ops.lowrank)
from lowrank.ops import rank1_experts_lora
from lowrank.ops._backends import triton_reasons
from tests.ops.test_rank1_experts_lora import check_forward, make_inputs
from lowrank.reference import rank1_experts_lora as reference
from tests.conftest import assert_grads_match_oracle

OPCHECK_OPS = {"rank1_experts_lora_triton"}   # read by tests/test_registry.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASONS = triton_reasons(DEVICE)
pytestmark = pytest.mark.skipif(bool(_REASONS), reason="; ".join(_REASONS) or "triton can run")

# (leading dims, in, out, E, k)
SHAPES = [((1,), 5, 3, 1, 1), ((3,), 17, 9, 4, 4), ((17,), 33, 20, 8, 3), ((2, 3), 40, 17, 5, 2)]


def _dev(args, kw):
    args = [a.to(DEVICE) if a is not None else None for a in args]
    return args, {n: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for n, v in kw.items()}


@pytest.mark.parametrize("gate", ["router", "self"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_parity(dtype, shape, gate):
    lead, in_, out, E, k = shape
    args, kw = _dev(*make_inputs(lead, in_, out, E, dtype, gate, bias=E % 2 == 1, router_bias=gate == "router"))
    check_forward(args, kw, k, "triton", scaling=0.7)


@pytest.mark.parametrize("gate,extra", [("self", {"temperature": 0.3, "threshold": 0.2}),
                                        ("router", {"threshold": 0.3})])
def test_temperature_threshold(gate, extra):
    args, kw = _dev(*make_inputs((9,), 12, 10, 8, torch.float32, gate))
    check_forward(args, kw, 4, "triton", scaling=1.3, **extra)


@pytest.mark.parametrize("gate", ["router", "self"])
def test_ties_match_cpp_rule(gate):
    x = torch.randint(-3, 4, (7, 8)).float()
    a = torch.randint(-2, 3, (3, 8)).float()
    lora_a = torch.cat([a[:1], a[:1], a[1:2], a[1:2], a[2:], a[2:]])
    w, bb = torch.randn(5, 8), torch.randn(5, 6)
    kw = {"gate": gate, **({"router": lora_a.clone()} if gate == "router" else {})}
    args, kw = _dev([x, w, None, lora_a, bb], kw)
    _, idx, _ = rank1_experts_lora(*args, 3, backend="triton", **kw)
    _, ridx, _ = reference(*args, 3, **kw)
    assert torch.equal(idx, ridx)


@pytest.mark.parametrize("gate", ["router", "self"])
def test_backward_parity(gate):
    args, kw = make_inputs((17,), 24, 20, 6, torch.float32, gate)
    full = args + ([kw["router"]] if gate == "router" else [])
    full = [a.to(DEVICE) for a in full]
    leaves = [a.detach().requires_grad_(True) for a in full]
    y, _, _ = rank1_experts_lora(*leaves[:5], 2, scaling=0.5, gate=gate, backend="triton",
                                 **({"router": leaves[5]} if gate == "router" else {}))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)

    def fn(*a):
        return reference(*a[:5], 2, scaling=0.5, gate=gate, **({"router": a[5]} if gate == "router" else {}))[0]
    assert_grads_match_oracle(grads, fn, full, g, list(range(len(full))))


def test_opcheck():
    args, kw = _dev(*make_inputs((2, 3), 17, 5, 6, torch.float32, "router", router_bias=True))
    opcheck(torch.ops.lowrank.rank1_experts_lora_triton.default,
            (*args, kw["router"], kw["router_bias"], 3, 0.5, "router", 1.0, None),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
