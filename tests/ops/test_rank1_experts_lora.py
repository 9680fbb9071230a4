"""lowrank.ops.rank1_experts_lora: parity with the reference, selection rule, opcheck, gradcheck, torch.compile,
bad input. Backends "cpp" and "torch" run here.

Top-k is piecewise constant: parity and gradcheck inputs are random fp32/fp64 data, whose scores are distinct and
far apart compared with rounding (the gate math runs in fp32 for every dtype, so bf16 inputs do not tie either);
ties are tested separately on exactly representable inputs.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from lowrank.ops import BackendUnavailableError, rank1_experts_lora
from lowrank.reference import rank1_experts_lora as reference
from lowrank.reference import rank1_experts_lora_dense
from tests.conftest import ALL_DTYPES, assert_grads_match_oracle, assert_matches_oracle

OPCHECK_OPS = {"rank1_experts_lora", "rank1_experts_lora_backward"}
BACKENDS = ("cpp", "torch")
# (leading dims of x, in, out, E, k): odd token counts 1, 3, 17, 255; E = 1, k = 1, k = E.
SHAPES = [
    ((1,), 5, 3, 1, 1),
    ((3,), 17, 9, 4, 4),
    ((17,), 33, 65, 8, 1),
    ((255,), 40, 70, 16, 3),
    ((2, 9), 65, 33, 64, 8),
    ((2,), 40, 70, 32, 3),     # T·k < E: the CPU expand reads lora_b in place; bf16 ≤ 8 tokens: dot-product shrink
]
GATES = ("router", "self")


def make_inputs(lead, in_, out, E, dtype, gate="router", bias=True, router_bias=False):
    """[x, weight, bias, lora_a, lora_b] and the keyword arguments (router, router_bias) of one case."""
    def t(*s):
        return torch.randn(*s, dtype=torch.float64).to(dtype)
    x = t(*lead, in_)
    args = [x, t(out, in_) / math.sqrt(in_), t(out) if bias else None, t(E, in_) / math.sqrt(in_), t(out, E)]
    kw = {"gate": gate}
    if gate == "router":
        kw["router"] = t(E, in_) / math.sqrt(in_)
        if router_bias:
            kw["router_bias"] = torch.randn(E) * 0.1
    return args, kw


def _ref(k, **kw):
    return lambda *a, **kw2: reference(*a, k, **kw, **kw2)


def check_forward(args, kw, k, backend, **extra):
    y, idx, gates = rank1_experts_lora(*args, k, backend=backend, **kw, **extra)
    ry, ridx, rg = reference(*[a.double() if a is not None else None for a in args], k,
                             **{n: (v.double() if isinstance(v, torch.Tensor) and n != "router_bias" else v)
                                for n, v in kw.items()}, **extra)
    assert idx.dtype == torch.int64 and torch.equal(idx, ridx), "selected experts differ from the oracle"
    assert gates.dtype == (torch.float64 if args[0].dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(gates.double(), rg, rtol=1e-5, atol=1e-6)
    # y: tolerance rule against the fp64 oracle (router_bias stays as given: selection only).
    rb = kw.get("router_bias")
    kw_t = {n: v for n, v in kw.items() if n not in ("router", "router_bias")}
    fn = (lambda *a: reference(*a[:5], k, router=a[5], router_bias=rb, **kw_t, **extra)[0]) if "router" in kw else \
        (lambda *a: reference(*a[:5], k, **kw_t, **extra)[0])
    assert_matches_oracle(y, fn, args + ([kw["router"]] if "router" in kw else []))
    return y, idx, gates


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("gate", GATES)
def test_forward_matches_reference(backend, dtype, shape, gate):
    lead, in_, out, E, k = shape
    args, kw = make_inputs(lead, in_, out, E, dtype, gate, bias=E % 2 == 0, router_bias=gate == "router")
    y, idx, gates = check_forward(args, kw, k, backend, scaling=0.7)
    assert y.shape == (*lead, out) and idx.shape == gates.shape == (*lead, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate,extra", [("self", {"temperature": 0.3}), ("self", {"threshold": 0.2}),
                                        ("router", {"threshold": 0.3}),
                                        ("self", {"temperature": 2.0, "threshold": 0.245})])
def test_temperature_and_threshold(backend, gate, extra):
    args, kw = make_inputs((33,), 24, 20, 12, torch.float32, gate)
    _, _, gates = check_forward(args, kw, 4, backend, scaling=1.3, **extra)
    if "threshold" in extra:
        assert (gates == 0).any() and not ((gates > 0) & (gates < extra["threshold"])).any()


def test_router_bias_moves_selection_only():
    args, kw = make_inputs((9,), 16, 8, 6, torch.float32, "router")
    kw["router_bias"] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    y, idx, gates = check_forward(args, kw, 2, "cpp")
    assert (idx == 5).any(dim=-1).all(), "a large bias must force expert 5 into every selection"
    p = torch.sigmoid(args[0] @ kw["router"].t())
    torch.testing.assert_close(gates, p.gather(1, idx) / p.gather(1, idx).sum(-1, keepdim=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
def test_ties_go_to_the_lower_index(backend, gate):
    """Duplicate experts give bit-equal scores (small integers: exact in any summation order)."""
    x = torch.randint(-3, 4, (7, 8)).float()
    a = torch.randint(-2, 3, (3, 8)).float()
    lora_a = torch.cat([a[:1], a[:1], a[1:2], a[1:2], a[2:], a[2:]])    # experts 2j and 2j+1 identical
    w, bb = torch.randn(5, 8), torch.randn(5, 6)
    kw = {"gate": gate}
    if gate == "router":
        kw["router"] = lora_a.clone()
    _, idx, _ = rank1_experts_lora(x, w, None, lora_a, bb, 3, backend=backend, **kw)
    _, ridx, _ = reference(x.double(), w.double(), None, lora_a.double(), bb.double(), 3,
                           **{n: v.double() if isinstance(v, torch.Tensor) else v for n, v in kw.items()})
    assert torch.equal(idx, ridx)
    # Within each selected pair the even (lower) expert comes first and is never skipped for its twin.
    for row in idx.tolist():
        for j, e in enumerate(row):
            if e % 2 == 1:
                assert e - 1 in row[:j], f"odd expert {e} selected before its lower-index twin: {row}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=str)
@pytest.mark.parametrize("gate", GATES)
def test_backward_matches_reference(backend, dtype, shape, gate):
    lead, in_, out, E, k = shape
    args, kw = make_inputs(lead, in_, out, E, dtype, gate, router_bias=gate == "router")
    full = args + ([kw["router"]] if gate == "router" else [])
    leaves = [a.detach().requires_grad_(True) for a in full]
    kw2 = {n: v for n, v in kw.items() if n != "router"}
    y, _, gates = rank1_experts_lora(*leaves[:5], k, scaling=1.5, backend=backend,
                                     **({"router": leaves[5]} if gate == "router" else {}), **kw2)
    g = torch.randn_like(y)
    wrt = list(range(len(full)))
    grads = torch.autograd.grad(y, leaves, g)
    if gate == "router" and k == 1:
        # One expert: its gate is p/p = 1 whatever the router, so the router's gradient is identically zero
        # (the reference's autograd leaves rounding noise of a few ulps there; the kernel gives exact zeros).
        assert backend == "torch" or torch.count_nonzero(grads[5]) == 0
        wrt, grads = wrt[:5], grads[:5]

    def fn(*a):
        return reference(*a[:5], k, scaling=1.5, **({"router": a[5]} if gate == "router" else {}), **kw2)[0]
    assert_grads_match_oracle(grads, fn, full, g, wrt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("gate,extra", [("router", {}), ("router", {"threshold": 0.08}), ("self", {}),
                                        ("self", {"temperature": 0.7, "threshold": 0.07})])
def test_backward_wide_layers_many_experts_and_gate_grads(gate, extra, threads, dtype):
    """The CPU backward's sparse passes over the selected experts: k = 11 > 8 (two groups of a token's experts),
    in / out past one 512-column slab with a partial last group of 16, one or two column ranges (threads),
    pruned gates, and a loss that also reads the returned gates (their gradient flows into the router / h)."""
    lead, in_, out, E, k = (2, 67), 1030, 530, 24, 11   # 134 tokens: past the sparse backward's thresholds
    torch.set_num_threads(threads)
    args, kw = make_inputs(lead, in_, out, E, dtype, gate, router_bias=gate == "router")
    full = args + ([kw["router"]] if gate == "router" else [])
    leaves = [a.detach().requires_grad_(True) for a in full]
    kw2 = {n: v for n, v in kw.items() if n != "router"}
    y, _, gates = rank1_experts_lora(*leaves[:5], k, scaling=1.5, **({"router": leaves[5]} if gate == "router"
                                                                       else {}), **kw2, **extra)
    if "threshold" in extra:
        assert (gates == 0).any()
    g = torch.randn_like(y)
    gg = torch.randn(gates.shape).to(dtype).to(gates.dtype)   # representable in x's dtype: the oracle casts it
    grads = torch.autograd.grad([y, gates], leaves, [g, gg])

    def fn(*a):
        ry, _, rg = reference(*a[:5], k, scaling=1.5, **({"router": a[5]} if gate == "router" else {}), **kw2,
                              **extra)
        return torch.cat([ry.flatten(), rg.to(ry.dtype).flatten()])
    assert_grads_match_oracle(grads, fn, full, torch.cat([g.flatten(), gg.to(dtype).flatten()]),
                              list(range(len(full))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gate", GATES)
def test_sparse_paths_read_strided_inputs_in_place(gate, dtype):
    """From 128 tokens the CPU kernels read x and grad_y by row stride and take factors of any layout: x and lora_b
    as column slices of wider buffers (lora_b as in the packed [W | B] layout), lora_a from transposed storage."""
    T, in_, out, E, k = 130, 130, 90, 16, 5
    args, kw = make_inputs((T,), in_, out, E, dtype, gate, router_bias=gate == "router")
    wide_x = torch.randn(T, in_ + 7).to(dtype)
    wide_x[:, :in_] = args[0]
    wide_b = torch.randn(out, in_ + E).to(dtype)
    wide_b[:, in_:] = args[4]
    args[0], args[4] = wide_x[:, :in_], wide_b[:, in_:]
    args[3] = args[3].t().contiguous().t()
    assert args[0].stride(0) == in_ + 7 and args[4].stride(0) == in_ + E and not args[3].is_contiguous()
    full = args + ([kw["router"]] if gate == "router" else [])
    leaves = [a.detach().requires_grad_(True) for a in full]
    kw2 = {n: v for n, v in kw.items() if n != "router"}
    y = rank1_experts_lora(*leaves[:5], k, scaling=0.7, **({"router": leaves[5]} if gate == "router" else {}),
                           **kw2)[0]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)

    def fn(*a):
        return reference(*a[:5], k, scaling=0.7, **({"router": a[5]} if gate == "router" else {}), **kw2)[0]
    assert_matches_oracle(y, fn, full)
    assert_grads_match_oracle(grads, fn, full, g, list(range(len(full))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [((3,), 17, 9, 4, 4), ((4,), 100, 50, 64, 8), ((7,), 33, 20, 8, 2), ((255,), 40, 70, 16, 3),
                                   ((2, 9), 65, 33, 64, 8), ((8,), 1025, 67, 16, 4)], ids=str)
@pytest.mark.parametrize("gate", GATES)
def test_packed_layout(dtype, shape, gate):
    """weight and lora_b as the column blocks of one [out, in + E] buffer (Rank1ExpertsLinear's bf16 layout: the CPU
    kernel runs [x | U]·[W | B]ᵀ as one GEMM; 1–8 bf16 tokens without AMX: the decode passes, forward and dx, with
    a column tail of 1025 and an odd row count); forward and backward parity, inputs left as they were."""
    lead, in_, out, E, k = shape
    args, kw = make_inputs(lead, in_, out, E, dtype, gate, router_bias=gate == "router")
    buf = torch.cat([args[1], args[4]], dim=1)
    args[1], args[4] = buf[:, :in_], buf[:, in_:]
    before = buf.clone()
    check_forward(args, kw, k, "cpp", scaling=0.6)
    full = args + ([kw["router"]] if gate == "router" else [])
    leaves = [a.detach().requires_grad_(True) for a in full]
    y = rank1_experts_lora(*leaves[:5], k, scaling=0.6, gate=gate,
                           **({"router": leaves[5], "router_bias": kw["router_bias"]} if gate == "router" else {}))[0]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)

    def fn(*a):
        extra = {"router": a[5], "router_bias": kw["router_bias"]} if gate == "router" else {}
        return reference(*a[:5], k, scaling=0.6, gate=gate, **extra)[0]
    assert_grads_match_oracle(grads, fn, full, g, list(range(len(full))))
    assert torch.equal(buf, before)


@pytest.mark.parametrize("gate", GATES)
def test_gradients_touch_only_selected_experts(gate):
    args, kw = make_inputs((5,), 12, 7, 16, torch.float32, gate)
    leaves = [a.detach().requires_grad_(True) if a is not None else None for a in args]
    y, idx, _ = rank1_experts_lora(*leaves, 2, **kw)
    y.sum().backward()
    unused = torch.ones(16, dtype=torch.bool)
    unused[idx.unique()] = False
    assert unused.any()
    assert torch.count_nonzero(leaves[4].grad[:, unused]) == 0
    if gate == "router":   # under "self" the L2 norm gives every a_e a gradient (documented)
        assert torch.count_nonzero(leaves[3].grad[unused]) == 0


@pytest.mark.parametrize("gate,extra", [("router", {}), ("self", {"temperature": 0.5}),
                                        ("self", {"threshold": 0.3})])
def test_gradcheck_fp64(gate, extra):
    args, kw = make_inputs((2, 3), 6, 5, 5, torch.float64, gate)
    full = args + ([kw["router"]] if gate == "router" else [])
    leaves = tuple(a.detach().requires_grad_(True) for a in full)

    def f(*a):
        y, _, g = rank1_experts_lora(*a[:5], 2, scaling=0.7, gate=gate, **({"router": a[5]} if gate == "router"
                                                                              else {}), **extra)
        return y, g
    assert torch.autograd.gradcheck(f, leaves)


def _opcheck_args(gate, dtype, requires_grad=False):
    args, kw = make_inputs((2, 3), 17, 5, 6, dtype, gate, router_bias=gate == "router")
    args = [a.requires_grad_(requires_grad) if a is not None else None for a in args]
    return (*args, kw.get("router"), kw.get("router_bias"), 3, 0.5, gate, 1.0, None)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype,requires_grad", [(torch.float32, False), (torch.bfloat16, False),
                                                 (torch.float64, True)], ids=str)
def test_opcheck_forward(gate, dtype, requires_grad):
    opcheck(torch.ops.lowrank.rank1_experts_lora.default, _opcheck_args(gate, dtype, requires_grad))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("mask", [[True] * 5, [False, False, True, True, False], [True, False, False, False, True]])
def test_opcheck_backward(gate, mask):
    a = _opcheck_args(gate, torch.float64)
    _, idx, gates, act = torch.ops.lowrank.rank1_experts_lora(*a)
    x, w, _, la, lb, router = a[:6]
    g = torch.randn(2, 3, 5, dtype=torch.float64)
    opcheck(torch.ops.lowrank.rank1_experts_lora_backward.default,
            (g, torch.randn_like(gates), x, w, la, lb, router, idx, act, 0.5, gate, 1.0, None, mask))


@pytest.mark.parametrize("gate", GATES)
def test_compile_fullgraph_parity(gate):
    torch._dynamo.reset()
    args, kw = make_inputs((3, 17), 33, 9, 8, torch.float32, gate)
    f = torch.compile(lambda *a: rank1_experts_lora(*a, 3, scaling=0.25, **kw), fullgraph=True, dynamic=True)
    y, idx, gates = f(*args)
    ry, ridx, rg = reference(*args, 3, scaling=0.25, **kw)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gates, rg)
    args2, _ = make_inputs((5,), 33, 9, 8, torch.float32, gate)
    torch.testing.assert_close(f(*args2)[0], reference(*args2, 3, scaling=0.25, **kw)[0], rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_backward():
    torch._dynamo.reset()
    args, kw = make_inputs((6,), 7, 5, 6, torch.float32, "router")
    full = args + [kw["router"]]
    leaves = [t.detach().requires_grad_(True) for t in full]
    ref_leaves = [t.detach().requires_grad_(True) for t in full]

    def loss(fn, a):
        y, _, g = fn(*a[:5], 2, scaling=0.5, router=a[5])
        return y.square().sum() + g.sum(0)[0]
    loss(torch.compile(rank1_experts_lora, fullgraph=True), leaves).backward()
    loss(reference, ref_leaves).backward()
    for t, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
def test_empty_batch(backend, gate):
    args, kw = make_inputs((0, 3), 6, 4, 5, torch.float32, gate)
    leaves = [t.detach().requires_grad_(True) for t in args]
    y, idx, gates = rank1_experts_lora(*leaves, 2, backend=backend, **kw)
    assert y.shape == (0, 3, 4) and idx.shape == gates.shape == (0, 3, 2)
    y.sum().backward()
    assert leaves[0].grad.shape == args[0].shape and torch.count_nonzero(leaves[4].grad) == 0


def test_inputs_not_modified_and_non_contiguous():
    args, kw = make_inputs((9,), 16, 12, 6, torch.float32, "router", router_bias=True)
    args[0] = torch.randn(16, 9).t()
    args[3] = torch.randn(16, 6).t()
    before = [t.clone() for t in args] + [kw["router"].clone(), kw["router_bias"].clone()]
    leaves = [t.requires_grad_(True) for t in args]
    check_forward(leaves, kw, 3, "cpp")
    rank1_experts_lora(*leaves, 3, **kw)[0].sum().backward()
    for t, c in zip(leaves + [kw["router"], kw["router_bias"]], before):
        assert torch.equal(t.detach(), c)


def test_dense_peer_agrees_in_fp32():
    for gate in GATES:
        args, kw = make_inputs((20,), 24, 16, 8, torch.float32, gate)
        y, idx, g = rank1_experts_lora_dense(*args, 3, scaling=0.5, **kw)
        ry, ridx, rg = reference(*args, 3, scaling=0.5, **kw)
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-4)


def test_unknown_and_unavailable_backend():
    args, kw = make_inputs((2,), 3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="backend must be"):
        rank1_experts_lora(*args, 1, backend="mkl", **kw)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda: runs on cuda, not cpu"):
            rank1_experts_lora(*args, 1, backend="cuda", **kw)


# ---- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,exc,match", [
    ({"top_k": 5}, ValueError, r"top_k must be in \[1, E=4\]"),
    ({"top_k": 0}, ValueError, "top_k must be in"),
    ({"top_k": 2.0}, TypeError, "top_k must be an int"),
    ({"x": torch.randn(3, 6)}, ValueError, r"x.shape\[-1\] = 6"),
    ({"lora_a": torch.randn(4, 6)}, ValueError, "lora_a must be"),
    ({"lora_b": torch.randn(4, 3)}, ValueError, "lora_b must be"),
    ({"router": torch.randn(3, 5)}, ValueError, "router must be"),
    ({"router": None}, ValueError, "needs router"),
    ({"router_bias": torch.randn(3)}, ValueError, "router_bias must be"),
    ({"gate": "softmax"}, ValueError, "gate must be"),
    ({"gate": "self"}, ValueError, "takes no router"),
    ({"weight": torch.randn(4, 5, dtype=torch.float64)}, TypeError, "weight has dtype"),
    ({"router": torch.randn(4, 5, dtype=torch.bfloat16)}, TypeError, "router has dtype"),
    ({"lora_a": torch.randn(4, 5, device="meta")}, ValueError, "lora_a is on meta"),
    ({"router_bias": torch.randn(4, device="meta")}, ValueError, "router_bias is on meta"),
    ({"temperature": 0.0}, ValueError, "temperature must be positive"),
    ({"temperature": 2.0}, ValueError, "temperature applies to gate='self'"),
    ({"scaling": float("nan")}, ValueError, "scaling must be"),
    ({"threshold": "0.1"}, TypeError, "threshold must be"),
    ({"x": [[1.0] * 5]}, TypeError, "x must be a torch.Tensor"),
])
def test_bad_input(change, exc, match):
    args, kw = make_inputs((3,), 5, 6, 4, torch.float32, "router", router_bias=True)
    call = dict(zip(["x", "weight", "bias", "lora_a", "lora_b"], args), top_k=2, **kw)
    call.update(change)
    pos = [call.pop(n) for n in ["x", "weight", "bias", "lora_a", "lora_b", "top_k"]]
    with pytest.raises(exc, match=match):
        rank1_experts_lora(*pos, **call)


def test_direct_op_call_checks_in_cpp():
    a = list(_opcheck_args("router", torch.float32))
    bad = a.copy()
    bad[7] = 7
    with pytest.raises(ValueError, match="top_k must be in"):
        torch.ops.lowrank.rank1_experts_lora(*bad)
    bad = a.copy()
    bad[5] = torch.randn(6, 4)
    with pytest.raises(ValueError, match="router must be"):
        torch.ops.lowrank.rank1_experts_lora(*bad)
    bad = a.copy()
    bad[9] = "other"
    with pytest.raises(ValueError, match="gate must be"):
        torch.ops.lowrank.rank1_experts_lora(*bad)


_NO_AMX_SCRIPT = """
import torch
from lowrank.ops import rank1_experts_lora
from lowrank.reference import rank1_experts_lora as reference
from tests.conftest import assert_grads_match_oracle
from tests.ops.test_rank1_experts_lora import check_forward, make_inputs
torch.manual_seed(0)
for gate in ("router", "self"):
    for shape in [((40,), 100, 47, 16, 4), ((3,), 64, 20, 8, 8), ((33,), 255, 17, 12, 3)]:
        lead, in_, out, E, k = shape
        args, kw = make_inputs(lead, in_, out, E, torch.bfloat16, gate)
        check_forward(args, kw, k, "cpp", scaling=0.5)
        full = args + ([kw["router"]] if gate == "router" else [])
        leaves = [a.detach().requires_grad_(True) for a in full]
        y = rank1_experts_lora(*leaves[:5], k, gate=gate, **({"router": leaves[5]} if gate == "router" else {}))[0]
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, g)
        fn = lambda *a: reference(*a[:5], k, gate=gate, **({"router": a[5]} if gate == "router" else {}))[0]
        assert_grads_match_oracle(grads, fn, full, g, list(range(len(full))))
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx512_bf16", "avx2"])
def test_bf16_without_amx_matches_reference(isa):
    """LOWRANK_MAX_CPU_ISA=avx512_bf16: bf16 scores from the AVX512-BF16 broadcast-dot shrink (fp32 sums; odd in,
    a partial group of 16 score rows) and the ATen backward, as CPUs without AMX run them; =avx2: the widened fp32
    GEMM of CPUs without AVX512-BF16."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LOWRANK_MAX_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", _NO_AMX_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_autocast_cpu_bf16():
    """Under torch.autocast("cpu", bf16) the op runs on bf16 casts of x, weight, bias, the factors and the router
    (its autocast rule); the gates stay fp32 and the gradients reach fp32 leaves."""
    gen = torch.Generator().manual_seed(6)
    tensors = [torch.randn(*s, generator=gen) for s in ((40, 24), (16, 24), (16,), (8, 24), (16, 8), (8, 24))]
    leaves = [t.clone().requires_grad_(True) for t in tensors]

    def run(x, w, b, a, bb, r):
        return rank1_experts_lora(x, w, b, a, bb, 2, scaling=0.5, router=r)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, idx, gates = run(*leaves)
    want, want_idx, want_gates = run(*[t.to(torch.bfloat16) for t in tensors])
    assert y.dtype == torch.bfloat16 and gates.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    assert torch.equal(idx, want_idx)
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
