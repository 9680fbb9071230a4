"""lowrank.ops.lora_linear: parity with the reference, opcheck, gradcheck, torch.compile, bad input.

The "cpp" and "torch" backends run here; "triton" has its own file (interpreter), "cuda" too (skips without GPU).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import lowrank
from lowrank.ops import BackendUnavailableError, lora_linear
from lowrank.reference import lora_linear as reference
from tests.conftest import ALL_DTYPES, assert_grads_match_oracle, assert_matches_oracle

OPCHECK_OPS = {"lora_linear", "lora_linear_backward"}
BACKENDS = ("cpp", "torch")
# (leading dims of x, in, out, r): odd sizes 1, 3, 17, 255 and rank 1 on purpose.
SHAPES = [
    ((1,), 1, 1, 1),
    ((3,), 17, 3, 1),
    ((17,), 3, 255, 3),
    ((255,), 17, 17, 16),
    ((2, 17), 33, 65, 8),
    ((3, 1, 5), 255, 17, 17),
    ((2,), 1025, 33, 16),      # 1–4 tokens take the fused bf16 decode pass on AVX-512 BF16 CPUs; 1025 = 32·32 + 1
    ((7,), 1025, 35, 9),       # 5–8 tokens: the fused pass without AMX; with AMX it forms only the shrink
]


def make_inputs(lead, in_, out, r, dtype, bias=True, requires_grad=False, scale=1.0, joint=False):
    """Fresh random inputs; ``joint=True`` lays weight and lora_b out as LoRALinear.pack_() does: the column
    blocks of one [out, in + r] buffer (the CPU kernel's single-GEMM path for bf16)."""
    def t(*s):
        return (torch.randn(*s, dtype=torch.float64) * scale).to(dtype).requires_grad_(requires_grad)
    x = t(*lead, in_)
    w = t(out, in_) / math.sqrt(in_)
    b = t(out) if bias else None
    a = t(r, in_) / math.sqrt(in_)
    bb = t(out, r)
    if joint:
        buf = torch.cat([w.detach(), bb.detach()], dim=1)
        w, bb = buf[:, :in_], buf[:, in_:].requires_grad_(requires_grad)
    return [x, w.detach().requires_grad_(requires_grad), b, a.detach().requires_grad_(requires_grad),
            bb]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(backend, dtype, shape, bias):
    args = make_inputs(*shape, dtype, bias=bias) + [0.37]
    y = lora_linear(*args, backend=backend)
    assert_matches_oracle(y, reference, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 8, 9, 65])
@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
def test_forward_large_weight_few_tokens(dtype, tokens, joint):
    """The token/size regimes where the CPU kernel picks another base GEMM (oneDNN, the fused decode pass)."""
    args = make_inputs((tokens,), 2048, 2049, 5, dtype, joint=joint) + [0.5]
    y = lora_linear(*args, backend="cpp")
    assert_matches_oracle(y, reference, args)


@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("shape", [(2048, 2049, 5), (33, 31, 16), (1, 1, 1)], ids=str)
@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
def test_backward_few_tokens_bf16(tokens, shape, joint):
    """bf16 backward at decode sizes: without AMX, g·W (g·[W | B] joint) is one pass over the weights
    (cpu::decode_nn_bf16) for up to 8 tokens: odd row counts (the last row pairs with zeros), column tails of a
    32-wide block, panels of rows (2049 rows), and 9 tokens (past it: oneDNN)."""
    args = make_inputs((tokens,), *shape, torch.bfloat16, bias=True, joint=joint) + [0.5]
    leaves = [a.detach().requires_grad_(True) for a in args[:5]] + [args[5]]
    y = lora_linear(*leaves, backend="cpp")
    g = torch.randn_like(y)
    wrt = [0, 3, 4]
    grads = torch.autograd.grad(y, [leaves[i] for i in wrt], g)
    assert_grads_match_oracle(grads, reference, args, g, wrt)


JOINT_SHAPES = SHAPES + [((33,), 64, 48, 40), ((300,), 4096, 17, 16), ((16,), 31, 9, 256), ((12,), 100, 47, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", JOINT_SHAPES, ids=str)
def test_forward_joint_layout_matches_reference(backend, dtype, shape):
    """weight and lora_b as views of one [out, in + r] buffer (LoRALinear's packed layout): for bf16 the CPU
    kernel runs [x | s·x·Aᵀ]·[W | B]ᵀ as one GEMM, with the shrink on AMX tiles (16-row blocks, K tails of any
    parity, r over several 16-wide groups) or AVX512-BF16; the inputs are left as they were."""
    args = make_inputs(*shape, dtype, joint=True) + [0.37]
    before = [a.clone() for a in args[:5] if a is not None]
    y = lora_linear(*args, backend=backend)
    assert_matches_oracle(y, reference, args)
    assert all(torch.equal(a, b) for a, b in zip([a for a in args[:5] if a is not None], before))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", JOINT_SHAPES[2:6] + [((65,), 100, 70, 40), ((2, 40), 64, 33, 16),
                                                     ((129,), 96, 40, 64), ((3, 100), 255, 17, 33)], ids=str)
def test_backward_joint_layout_matches_reference(dtype, shape):
    """Also the bf16 AMX backward (after g·[W | B], one fused pass over 128-token panels): token tails of 16/32 and
    of a panel (129 = 128 + 1), column tails, r > 16 (several 16-wide groups, r rounded up to 32)."""
    args = make_inputs(*shape, dtype, bias=True, joint=True) + [1.5]
    leaves = [a.detach().requires_grad_(True) for a in args[:5]] + [args[5]]
    y = lora_linear(*leaves, backend="cpp")
    g = torch.randn_like(y)
    wrt = [0, 1, 2, 3, 4]
    grads = torch.autograd.grad(y, [leaves[i] for i in wrt], g)
    assert_grads_match_oracle(grads, reference, args, g, wrt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:5], ids=str)
def test_backward_matches_reference(backend, dtype, shape):
    args = make_inputs(*shape, dtype, bias=True) + [1.5]
    leaves = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    y = lora_linear(*leaves, backend=backend)
    g = torch.randn_like(y)
    wrt = [0, 1, 2, 3, 4]
    grads = torch.autograd.grad(y, [leaves[i] for i in wrt], g)
    assert_grads_match_oracle(grads, reference, args, g, wrt)


@pytest.mark.parametrize("requires", [(True, False, False, True, True), (False, False, False, True, True),
                                      (True, True, True, False, False)])
def test_backward_only_requested_grads(requires):
    x, w, b, a, bb = make_inputs((5,), 7, 6, 2, torch.float32)
    leaves = [t.detach().requires_grad_(rq) for t, rq in zip((x, w, b, a, bb), requires)]
    lora_linear(*leaves, 0.5).sum().backward()
    for t, rq in zip(leaves, requires):
        assert (t.grad is not None) == rq


@pytest.mark.parametrize("mask", [(True, False, False, False), (True, False, True, False),
                                  (True, False, False, True), (True, True, True, True)], ids=str)
def test_backward_joint_layout_output_mask(mask):
    """The fused bf16 tail computes only what the mask asks for, and each gradient alone equals the full run's."""
    x, w, _, a, bb = make_inputs((150,), 64, 80, 20, torch.bfloat16, joint=True)
    g = torch.randn(150, 80, dtype=torch.bfloat16)
    full = torch.ops.lowrank.lora_linear_backward(g, x, w, a, bb, 0.75, [True, True, True, True])
    part = torch.ops.lowrank.lora_linear_backward(g, x, w, a, bb, 0.75, list(mask))
    for want, got, m in zip(full, part, mask):
        assert (got is not None) == m
        if m:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_cpu_bf16(backend):
    """Under torch.autocast("cpu", bf16) the op computes in bf16 like the F.linear it replaces (the op's autocast
    rule casts fp32 weights and activations, a mixed bf16-activation/fp32-weight call is accepted), and the
    gradients reach the fp32 leaves in fp32."""
    args = make_inputs((33,), 40, 24, 8, torch.float32)
    leaves = [a.detach().requires_grad_(True) for a in args]
    x_bf16 = leaves[0].detach().to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(*leaves, 0.5, backend=backend)
        y_mixed = lora_linear(x_bf16, *leaves[1:], 0.5, backend=backend)
        want = reference(*[a.detach() for a in args], 0.5)
    assert y.dtype == torch.bfloat16 and want.dtype == torch.bfloat16
    torch.testing.assert_close(y_mixed, y, rtol=0, atol=0)
    bf = [a.detach().to(torch.bfloat16) for a in args]
    assert_matches_oracle(y, reference, bf + [0.5])
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


def test_autocast_keeps_fp64_refusing_mixes():
    x, w, b, a, bb = make_inputs((3,), 4, 5, 2, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="weight"):
        lora_linear(x, w.double(), b, a, bb, 0.5)


def test_gradcheck_fp64():
    args = make_inputs((2, 3), 5, 4, 2, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: lora_linear(*a, 0.7), tuple(args))


def test_gradcheck_fp64_no_bias():
    x, w, _, a, bb = make_inputs((3,), 4, 5, 3, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, a, bb: lora_linear(x, w, None, a, bb, -1.3), (x, w, a, bb))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_forward(requires_grad, dtype):
    args = make_inputs((2, 3), 17, 5, 3, dtype, requires_grad=requires_grad and dtype == torch.float64)
    opcheck(torch.ops.lowrank.lora_linear.default, (*args, 0.5))
    opcheck(torch.ops.lowrank.lora_linear.default, (args[0], args[1], None, args[3], args[4], 2.0))


@pytest.mark.parametrize("mask", [[True, True, True, True], [True, False, True, True], [False, False, True, False],
                                  [False, False, False, False]])
def test_opcheck_backward(mask):
    x, w, _, a, bb = make_inputs((2, 3), 17, 5, 3, torch.float64)
    g = torch.randn(2, 3, 5, dtype=torch.float64)
    opcheck(torch.ops.lowrank.lora_linear_backward.default, (g, x, w, a, bb, 0.5, mask))


def test_backward_op_masked_outputs_are_none():
    x, w, _, a, bb = make_inputs((4,), 3, 5, 2, torch.float32)
    g = torch.randn(4, 5)
    dx, dw, da, db = torch.ops.lowrank.lora_linear_backward(g, x, w, a, bb, 1.0, [False, True, False, True])
    assert dx is None and da is None and dw.shape == w.shape and db.shape == bb.shape


def test_double_backward_is_refused():
    args = make_inputs((3,), 4, 5, 2, torch.float64, requires_grad=True)
    y = lora_linear(*args, 0.5)
    (gx,) = torch.autograd.grad(y.sum(), args[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_parity(dtype):
    torch._dynamo.reset()
    args = make_inputs((3, 17), 33, 9, 4, dtype)
    f = torch.compile(lora_linear, fullgraph=True, dynamic=True)
    y = f(*args, 0.25)
    assert_matches_oracle(y, lambda *a: reference(*a, 0.25), args)
    # a second shape and scaling go through the same dynamic graph
    args2 = make_inputs((5,), 33, 9, 4, dtype)
    assert_matches_oracle(f(*args2, -1.5), lambda *a: reference(*a, -1.5), args2)


def test_compile_fullgraph_backward():
    torch._dynamo.reset()
    args = make_inputs((6,), 7, 5, 2, torch.float32)
    leaves = [t.detach().requires_grad_(True) for t in args]
    f = torch.compile(lambda *a: lora_linear(*a, 0.5), fullgraph=True)
    f(*leaves).square().sum().backward()
    ref_leaves = [t.detach().requires_grad_(True) for t in args]
    reference(*ref_leaves, 0.5).square().sum().backward()
    for t, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-5, atol=1e-5)


# ---- empty batches ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batch(backend, lead):
    x, w, b, a, bb = make_inputs(lead, 6, 4, 2, torch.float32)
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, a, bb)]
    y = lora_linear(*leaves, 1.0, backend=backend)
    assert y.shape == (*lead, 4)
    y.sum().backward()
    assert leaves[0].grad.shape == x.shape
    assert torch.count_nonzero(leaves[3].grad) == 0 and torch.count_nonzero(leaves[4].grad) == 0


def test_inputs_not_modified():
    args = make_inputs((5, 3), 7, 6, 2, torch.float32)
    before = [t.clone() for t in args]
    leaves = [t.requires_grad_(True) for t in args]
    lora_linear(*leaves, 0.5).sum().backward()
    for t, c in zip(args, before):
        assert torch.equal(t.detach(), c)


def test_non_contiguous_inputs():
    x, w, b, a, bb = make_inputs((9,), 16, 12, 4, torch.float32)
    xt = torch.randn(16, 9).t()              # [9, 16], non-contiguous
    wt = torch.randn(16, 12).t()             # [12, 16]
    at = torch.randn(16, 4).t()
    bt = torch.randn(4, 12).t()
    args = [xt, wt, b, at, bt, 0.3]
    assert_matches_oracle(lora_linear(*args), reference, args)


# ---- backend selection ----------------------------------------------------------------------------------------
def test_auto_picks_cpp_on_cpu():
    from lowrank.ops._backends import select
    from lowrank.ops.lora_linear import BACKENDS as table
    assert select("lora_linear", table, "auto", torch.device("cpu"), torch.float32).name == "cpp"


def test_unknown_backend():
    args = make_inputs((2,), 3, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="backend must be"):
        lora_linear(*args, 1.0, backend="mkl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_named_backend_refusal_lists_reasons():
    args = make_inputs((2,), 3, 4, 1, torch.float32)
    with pytest.raises(BackendUnavailableError, match="cuda: runs on cuda, not cpu"):
        lora_linear(*args, 1.0, backend="cuda")


# ---- bad input -------------------------------------------------------------------------------------------------
def _good():
    return make_inputs((3,), 5, 4, 2, torch.float32)


@pytest.mark.parametrize("idx,bad,exc,match", [
    (0, torch.randn(3, 6), ValueError, r"x.shape\[-1\] = 6"),
    (0, torch.tensor(1.0), ValueError, "x must have at least 1 dimension"),
    (1, torch.randn(4, 6), ValueError, "x.shape"),
    (1, torch.randn(4, 5, 1), ValueError, "weight must be 2-D"),
    (1, torch.randn(0, 5), ValueError, "weight must be non-empty"),
    (2, torch.randn(5), ValueError, "bias must be"),
    (3, torch.randn(2, 6), ValueError, "lora_a must be"),
    (3, torch.randn(0, 5), ValueError, "rank r >= 1"),
    (4, torch.randn(4, 3), ValueError, "lora_b must be"),
    (4, torch.randn(5, 2), ValueError, "lora_b must be"),
    (1, torch.randn(4, 5, dtype=torch.float64), TypeError, "weight has dtype torch.float64"),
    (4, torch.randn(4, 2, dtype=torch.bfloat16), TypeError, "lora_b has dtype"),
    (0, torch.ones(3, 5, dtype=torch.int32), TypeError, "x must be float32"),
    (3, torch.randn(2, 5, device="meta"), ValueError, "lora_a is on meta"),
    (3, [[1.0] * 5] * 2, TypeError, "lora_a must be a torch.Tensor"),
])
def test_bad_input(idx, bad, exc, match):
    args = _good()
    args[idx] = bad
    with pytest.raises(exc, match=match):
        lora_linear(*args, 1.0)


@pytest.mark.parametrize("scaling,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                         (-float("inf"), ValueError), ("1.0", TypeError),
                                         (torch.tensor(1.0), TypeError), (True, TypeError)])
def test_bad_scaling(scaling, exc):
    with pytest.raises(exc, match="scaling"):
        lora_linear(*_good(), scaling)


def test_direct_op_call_checks_in_cpp():
    x, w, b, a, bb = _good()
    with pytest.raises(ValueError, match="lora_b must be"):
        torch.ops.lowrank.lora_linear(x, w, b, a, torch.randn(3, 2), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.lowrank.lora_linear(x, w.double(), b, a, bb, 1.0)


def test_package_exports():
    assert lowrank.ops.lora_linear is lora_linear
    assert issubclass(lowrank.BackendUnavailableError, RuntimeError)


_NO_AMX_SCRIPT = """
import torch
from lowrank.ops import lora_linear
from lowrank.reference import lora_linear as reference
from tests.conftest import assert_grads_match_oracle, assert_matches_oracle
from tests.ops.test_lora_linear import make_inputs
torch.manual_seed(0)
cases = [((40,), 100, 47, 3), ((9,), 255, 33, 17), ((3,), 64, 20, 16), ((300,), 96, 64, 16), ((255,), 33, 65, 1),
         ((2, 17), 3, 255, 40), ((129,), 1, 3, 17)]
for joint in (True, False):
    for shape in cases:
        args = make_inputs(*shape, torch.bfloat16, joint=joint) + [0.37]
        assert_matches_oracle(lora_linear(*args, backend="cpp"), reference, args)
        for wrt in ([0, 1, 2, 3, 4], [3, 4], [0]):
            leaves = [a.detach().requires_grad_(i in wrt) for i, a in enumerate(args[:5])] + [args[5]]
            y = lora_linear(*leaves, backend="cpp")
            g = torch.randn_like(y)
            grads = torch.autograd.grad(y, [leaves[i] for i in wrt], g)
            assert_grads_match_oracle(grads, reference, args, g, wrt)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx512_bf16", "avx2"])
def test_joint_layout_without_amx_matches_reference(isa):
    """LOWRANK_MAX_CPU_ISA=avx512_bf16: the bf16 layer, packed and unpacked, on the AVX512-BF16 paths CPUs without
    AMX take (x' formed by the broadcast-dot kernel, oneDNN GEMMs, the fused decode passes up to 8 tokens, and past
    them the fused rank-r backward tail of cpu/rank_avx512.cpp: odd token counts, column tails, 1–3 rank groups,
    and each subset of gradients it computes); =avx2: the ATen paths of AVX2-only CPUs."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LOWRANK_MAX_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", _NO_AMX_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("env, match", [({"LOWRANK_MAX_CPU_ISA": "sse9"}, "LOWRANK_MAX_CPU_ISA=sse9 is not a level"),
                                        ({"LOWRANK_DISABLE_AMX": "1"}, "LOWRANK_DISABLE_AMX is no longer read")])
def test_cpu_isa_switch_errors(env, match):
    """A bad LOWRANK_MAX_CPU_ISA, or a retired per-kernel switch, fails the first kernel call with a ValueError
    naming the valid levels instead of being ignored."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = ("import torch, lowrank\n"
              "x = torch.randn(3, 4)\n"
              "try:\n"
              "    lowrank.ops.lora_linear(x, torch.randn(5, 4), None, torch.randn(2, 4), torch.randn(5, 2), 1.0)\n"
              "except ValueError as e:\n"
              "    print('ValueError:', e)\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOWRANK_")}
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2],
                         env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert "ValueError:" in out.stdout and match in out.stdout, out.stdout + out.stderr[-2000:]
