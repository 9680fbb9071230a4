"""lowrank.ops.multi_lora_linear: parity with the reference, opcheck, gradcheck, torch.compile, bad input.

The "cpp" and "torch" backends run here (the Triton kernel has its own file). Shapes cover odd token counts
(1, 3, 17, 255), K and output tails of the AVX-512 tiles, rank 1 and ranks that are not a multiple of the
4-rank tile, one adapter, many adapters, mixed with -1 and all -1.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.library import opcheck

from lowrank.ops import AdapterSegments, BackendUnavailableError, adapter_segments, multi_lora_linear
from lowrank.reference import multi_lora_linear as reference
from tests.conftest import ALL_DTYPES, assert_grads_match_oracle, assert_matches_oracle

OPCHECK_OPS = {"multi_lora_linear", "multi_lora_linear_backward"}
BACKENDS = ("cpp", "torch")
# (leading dims of x, in, out, n adapters, r)
SHAPES = [
    ((1,), 1, 1, 1, 1),
    ((3,), 17, 3, 2, 1),
    ((17,), 33, 255, 3, 5),
    ((255,), 65, 17, 4, 16),
    ((2, 17), 40, 65, 5, 8),
    ((5,), 1025, 35, 3, 9),
]
PATTERNS = ("mixed", "one", "all_none", "no_none", "runs")


def make_ids(tokens: int, n: int, pattern: str, lead=None) -> torch.Tensor:
    if pattern == "mixed":
        ids = torch.randint(-1, n, (tokens,))
    elif pattern == "one":
        ids = torch.full((tokens,), n - 1)
    elif pattern == "all_none":
        ids = torch.full((tokens,), -1)
    elif pattern == "runs":  # one adapter per sequence: runs of consecutive tokens (odd lengths, some without adapter)
        runs = [(37, 0), (20, -1), (131, 1 % n), (3, 2 % n), (64, 0), (45, -1), (1, 1 % n), (40, 2 % n)]
        ids = torch.cat([torch.full((length,), a) for length, a in runs])
        ids = ids.repeat(tokens // ids.numel() + 1)[:tokens]
    else:
        ids = torch.randint(0, n, (tokens,))
    return ids.reshape(lead) if lead is not None else ids


def make_inputs(lead, in_, out, n, r, dtype, *, pattern="mixed", bias=True, requires_grad=False):
    """[x, weight, bias, lora_a, lora_b, adapter_ids, scaling] with non-zero factors."""
    def t(*s, std=1.0):
        return (torch.randn(*s, dtype=torch.float64) * std).to(dtype).requires_grad_(requires_grad)
    tokens = math.prod(lead)
    x = t(*lead, in_)
    w = t(out, in_, std=in_ ** -0.5)
    b = t(out) if bias else None
    a = t(n, r, in_, std=in_ ** -0.5)
    bb = t(n, out, r, std=r ** -0.5)
    scaling = [0.5 + 0.25 * i for i in range(n)]
    return [x, w, b, a, bb, make_ids(tokens, n, pattern), scaling]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_matches_reference(backend, dtype, shape, pattern):
    if backend == "torch" and pattern != "mixed":
        pytest.skip("the torch backend is the reference itself: one pattern checks its wiring")
    args = make_inputs(*shape, dtype, pattern=pattern, bias=pattern != "no_none")
    y = multi_lora_linear(*args, backend=backend)
    assert_matches_oracle(y, reference, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 8, 9, 64])
def test_forward_large_weight_few_tokens(dtype, tokens):
    """Decode regimes: the bf16 base of 1–4 tokens (1–8 without AMX) is the fused AVX512-BF16 pass, fp32 2–64
    tokens oneDNN."""
    args = make_inputs((tokens,), 2048, 2049, 4, 16, dtype)
    assert_matches_oracle(multi_lora_linear(*args, backend="cpp"), reference, args)


@pytest.mark.parametrize("tokens", [1, 5, 8, 9])
@pytest.mark.parametrize("in_out", [(2048, 2049), (33, 70)], ids=str)
def test_backward_few_tokens_bf16(tokens, in_out):
    """bf16 dx at 1–8 tokens without AMX: g·W in one fp32 pass over W (odd row count 2049; 33 columns: a block
    tail, the fp32 sums' rows padded to 64), then the segmented rank-r add into them and one rounding; 9 tokens:
    oneDNN."""
    args = make_inputs((tokens,), *in_out, 4, 16, torch.bfloat16)
    leaves = [t.detach().requires_grad_(True) for t in args[:5]] + args[5:]
    y = multi_lora_linear(*leaves, backend="cpp")
    g = torch.randn_like(y)
    assert_grads_match_oracle(torch.autograd.grad(y, [leaves[0], leaves[3], leaves[4]], g), reference, args, g,
                              [0, 3, 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [16, 40])
def test_per_sequence_adapters(dtype, r):
    """Adapters per sequence: 16-token blocks of consecutive rows that the AMX shrink reads in place (K = 64, a
    whole number of 32-wide chunks) next to gathered tail blocks; r = 40 spans several tile groups / chunks."""
    x, w, b, a, bb, _, s = make_inputs((4, 33), 64, 40, 3, r, dtype)
    ids = torch.tensor([0, 2, -1, 0])[:, None].expand(4, 33)
    args = [x, w, b, a, bb, ids, s]
    assert_matches_oracle(multi_lora_linear(*args, backend="cpp"), reference, args)
    leaves = [t.detach().requires_grad_(True) for t in args[:5]] + args[5:]
    y = multi_lora_linear(*leaves, backend="cpp")
    g = torch.randn_like(y)
    assert_grads_match_oracle(torch.autograd.grad(y, leaves[:5], g), reference, args, g, [0, 1, 2, 3, 4])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_per_adapter_ranks(backend, dtype):
    """Padded storage, true ranks 16, 1, 0, 7, 16: the padding (filled with garbage) takes no part."""
    x, w, b, a, bb, ids, s = make_inputs((37,), 70, 66, 5, 16, dtype, pattern="no_none")
    ranks = [16, 1, 0, 7, 16]
    args = [x, w, b, a, bb, ids, s]
    y = multi_lora_linear(*args, ranks=ranks, backend=backend)
    assert_matches_oracle(y, reference, args, {"ranks": ranks})
    # the padding is never read: the same result with the padding zeroed
    a0, b0 = a.clone(), bb.clone()
    for i, k in enumerate(ranks):
        a0[i, k:] = 0
        b0[i, :, k:] = 0
    torch.testing.assert_close(multi_lora_linear(x, w, b, a0, b0, ids, s, ranks=ranks, backend=backend), y,
                               rtol=0, atol=0)


# fp16 takes the same ATen path as fp64 (no AVX-512 / AMX kernel) and its CPU reference is slow: forward only.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("pattern", ["mixed", "all_none"])
def test_backward_matches_reference(dtype, shape, pattern):
    args = make_inputs(*shape, dtype, pattern=pattern)
    leaves = [a.detach().requires_grad_(True) for a in args[:5]] + args[5:]
    y = multi_lora_linear(*leaves, backend="cpp")
    g = torch.randn_like(y)
    wrt = [0, 1, 2, 3, 4]
    grads = torch.autograd.grad(y, leaves[:5], g)
    assert_grads_match_oracle(grads, reference, args, g, wrt)


@pytest.mark.parametrize("order", ["sequences", "mixed"])
def test_backward_bf16_large_segments(order):
    """bf16 with hundreds of tokens per adapter (several 16/32-row tile blocks per segment), over whole sequences
    or scattered tokens, with per-adapter ranks below the storage rank and tokens without adapter."""
    x, w, b, a, bb, _, s = make_inputs((400,), 96, 80, 3, 20, torch.bfloat16)
    if order == "sequences":
        ids = torch.tensor([0, 2, -1, 1, 0, 1, 2, 0]).repeat_interleave(50)
    else:
        ids = torch.randint(-1, 3, (400,), generator=torch.Generator().manual_seed(3))
    ranks = [20, 7, 16]
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, a, bb)]
    y = multi_lora_linear(*leaves, ids, s, ranks=ranks)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    ref = functools.partial(reference, ranks=ranks)
    assert_grads_match_oracle(grads, ref, [x, w, b, a, bb, ids, s], g, [0, 1, 2, 3, 4])
    assert torch.count_nonzero(grads[3][1, 7:]) == 0 and torch.count_nonzero(grads[4][1][:, 7:]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_backward_ranks_and_absent_adapters(dtype):
    """Adapters no token uses, and the padding beyond each true rank, get exactly zero gradients."""
    x, w, b, a, bb, _, s = make_inputs((33,), 48, 40, 5, 12, dtype)
    ids = torch.tensor([0, 3, -1] * 11)        # adapters 1, 2 and 4 absent
    ranks = [12, 4, 5, 3, 1]
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, a, bb)]
    y = multi_lora_linear(*leaves, ids, s, ranks=ranks)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    ref = functools.partial(reference, ranks=ranks)
    assert_grads_match_oracle(grads, ref, [x, w, b, a, bb, ids, s], g, [0, 1, 2, 3, 4])
    da, db = grads[3], grads[4]
    for i in (1, 2, 4):
        assert torch.count_nonzero(da[i]) == 0 and torch.count_nonzero(db[i]) == 0
    for i in (0, 3):
        assert torch.count_nonzero(da[i, ranks[i]:]) == 0 and torch.count_nonzero(db[i, :, ranks[i]:]) == 0
        assert torch.count_nonzero(da[i, :ranks[i]]) > 0


def test_gradcheck_fp64():
    x, w, b, a, bb, ids, s = make_inputs((2, 3), 5, 4, 3, 2, torch.float64, requires_grad=True)
    ids = torch.tensor([[0, -1, 2], [2, 0, 0]])
    assert torch.autograd.gradcheck(lambda *t: multi_lora_linear(*t, ids, s), (x, w, b, a, bb))


def test_gradcheck_fp64_ranks_no_bias():
    x, w, _, a, bb, _, s = make_inputs((7,), 4, 5, 3, 3, torch.float64, requires_grad=True)
    ids = torch.tensor([1, 2, 0, -1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda *t: multi_lora_linear(t[0], t[1], None, t[2], t[3], ids, s,
                                                                 ranks=[3, 1, 2]), (x, w, a, bb))


def _op_args(args, ranks=None):
    x, w, b, a, bb, ids, s = args
    seg = adapter_segments(ids, a.shape[0])
    rk = None if ranks is None else torch.tensor(ranks)
    return (x, w, b, a, bb, torch.tensor(s, dtype=torch.float64), seg.perm, seg.offsets, rk)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_forward(requires_grad, dtype):
    args = make_inputs((2, 9), 17, 6, 3, 4, dtype, requires_grad=requires_grad and dtype == torch.float64)
    opcheck(torch.ops.lowrank.multi_lora_linear.default, _op_args(args))
    opcheck(torch.ops.lowrank.multi_lora_linear.default, _op_args(args, ranks=[4, 2, 1]))
    x, w, _, a, bb, *_ = _op_args(args)
    opcheck(torch.ops.lowrank.multi_lora_linear.default, (x, w, None, a, bb, *_op_args(args)[5:]))


@pytest.mark.parametrize("mask", [[True, True, True, True], [True, False, True, False], [False, False, False, True],
                                  [False, False, False, False]])
def test_opcheck_backward(mask):
    x, w, _, a, bb, s, perm, offsets, rk = _op_args(make_inputs((11,), 9, 7, 3, 4, torch.float64), ranks=[4, 1, 3])
    g = torch.randn(11, 7, dtype=torch.float64)
    opcheck(torch.ops.lowrank.multi_lora_linear_backward.default, (g, x, w, a, bb, s, perm, offsets, rk, mask))


def test_double_backward_is_refused():
    x, w, b, a, bb, ids, s = make_inputs((3,), 4, 5, 2, 2, torch.float64, requires_grad=True)
    y = multi_lora_linear(x, w, b, a, bb, ids, s)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_parity(dtype):
    """The ids → segments step and the op in one graph; a second token count reuses the dynamic graph."""
    torch._dynamo.reset()
    f = torch.compile(lambda *t: multi_lora_linear(*t), fullgraph=True, dynamic=True)
    for lead in ((3, 17), (5,)):
        args = make_inputs(lead, 33, 9, 3, 4, dtype)
        args[5] = args[5].reshape(lead)
        assert_matches_oracle(f(*args), reference, args)


def test_compile_fullgraph_segments_and_backward():
    """Segments built outside the compiled region (once per batch), forward + backward compiled."""
    torch._dynamo.reset()
    x, w, b, a, bb, ids, s = make_inputs((6,), 7, 5, 3, 2, torch.float32)
    seg = adapter_segments(ids, 3)
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, a, bb)]
    f = torch.compile(lambda x, w, b, a, bb: multi_lora_linear(x, w, b, a, bb, seg, s), fullgraph=True)
    f(*leaves).square().sum().backward()
    ref_leaves = [t.detach().requires_grad_(True) for t in (x, w, b, a, bb)]
    reference(*ref_leaves, ids, s).square().sum().backward()
    for t, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-5, atol=1e-5)


# ---- segment metadata ---------------------------------------------------------------------------------------
def test_segments_layout_and_reuse():
    ids = torch.tensor([[2, -1, 0], [2, 0, -1]], dtype=torch.int32)
    seg = adapter_segments(ids, 4)
    assert isinstance(seg, AdapterSegments) and seg.num_tokens == 6 and seg.n_adapters == 4
    assert seg.perm.tolist() == [2, 4, 0, 3, 1, 5] and seg.offsets.tolist() == [0, 2, 2, 4, 4]
    assert seg.counts.tolist() == [2, 0, 2, 0] and seg.active_adapters() == [0, 2]
    # one segment object serves every layer of a model: same result as passing the ids
    for in_, out in ((8, 6), (6, 10)):
        x, w, b, a, bb, _, s = make_inputs((2, 3), in_, out, 4, 3, torch.float32)
        torch.testing.assert_close(multi_lora_linear(x, w, b, a, bb, seg, s), multi_lora_linear(x, w, b, a, bb, ids, s),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_batch(backend, lead):
    x, w, b, a, bb, _, s = make_inputs(lead, 6, 4, 2, 2, torch.float32)
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, a, bb)]
    y = multi_lora_linear(*leaves, torch.zeros(lead, dtype=torch.int64), s, backend=backend)
    assert y.shape == (*lead, 4)
    y.sum().backward()
    assert leaves[0].grad.shape == x.shape and torch.count_nonzero(leaves[3].grad) == 0


def test_inputs_not_modified():
    args = make_inputs((9, 3), 7, 6, 3, 2, torch.float32)
    before = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
    leaves = [t.requires_grad_(True) for t in args[:5]]
    multi_lora_linear(*leaves, *args[5:]).sum().backward()
    for t, c in zip(args, before):
        assert torch.equal(t.detach(), c) if isinstance(t, torch.Tensor) else t == c


def test_non_contiguous_inputs():
    x = torch.randn(16, 9).t()                 # [9, 16]
    w = torch.randn(16, 12).t()                # [12, 16]
    a = torch.randn(3, 16, 4).transpose(1, 2)  # [3, 4, 16]
    bb = torch.randn(3, 4, 12).transpose(1, 2)  # [3, 12, 4]
    args = [x, w, None, a, bb, torch.tensor([0, 1, 2, -1, 0, 1, 2, 2, 0]), [0.3, -1.0, 2.0]]
    assert_matches_oracle(multi_lora_linear(*args), reference, args)


def test_auto_picks_cpp_on_cpu_and_refusals():
    from lowrank.ops._backends import select
    from lowrank.ops.multi_lora_linear import BACKENDS as table
    assert select("multi_lora_linear", table, "auto", torch.device("cpu"), torch.float32).name == "cpp"
    args = make_inputs((2,), 3, 4, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="backend must be"):
        multi_lora_linear(*args, backend="mkl")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda: runs on cuda, not cpu"):
            multi_lora_linear(*args, backend="cuda")


# ---- bad input -------------------------------------------------------------------------------------------------
def _good():
    return make_inputs((4,), 5, 3, 2, 2, torch.float32)


@pytest.mark.parametrize("idx,bad,exc,match", [
    (5, torch.tensor([0, 1, 2, 0]), ValueError, r"adapter_ids has value 2, outside \[-1, 2\)"),
    (5, torch.tensor([0, -2, 1, 0]), ValueError, r"adapter_ids has value -2"),
    (5, torch.tensor([0.0, 1.0, 1.0, 0.0]), TypeError, "adapter_ids must be int32 or int64"),
    (5, torch.tensor([0, 1, 1]), ValueError, "adapter_ids has 3 entries"),
    (5, torch.tensor([0, 1, 1, 0], device="meta"), ValueError, "adapter_ids is on meta but x is on cpu"),
    (5, [0, 1, 1, 0], TypeError, "adapter_ids must be a torch.Tensor or AdapterSegments"),
    (6, [1.0], ValueError, "scaling must have n=2 entries"),
    (6, [1.0, float("nan")], ValueError, "scaling must be finite"),
    (6, "1.0", TypeError, "scaling must be"),
    (6, torch.ones(2, device="meta"), ValueError, "scaling is on meta"),
    (0, torch.randn(4, 6), ValueError, r"x.shape\[-1\] = 6"),
    (1, torch.randn(3, 5, 1), ValueError, "weight must be 2-D"),
    (3, torch.randn(2, 2, 6), ValueError, "lora_a must be"),
    (3, torch.randn(2, 5), ValueError, "lora_a must be 3-D"),
    (4, torch.randn(2, 3, 3), ValueError, "lora_b must be"),
    (4, torch.randn(3, 3, 2), ValueError, "lora_b must be"),
    (4, torch.randn(2, 3, 2, dtype=torch.float64), TypeError, "lora_b has dtype torch.float64"),
    (2, torch.randn(4), ValueError, "bias must be"),
    (0, torch.ones(4, 5, dtype=torch.int32), TypeError, "x must be float32"),
])
def test_bad_input(idx, bad, exc, match):
    args = _good()
    args[idx] = bad
    with pytest.raises(exc, match=match):
        multi_lora_linear(*args)


@pytest.mark.parametrize("ranks,exc,match", [([2, 3], ValueError, r"ranks must lie in \[0, r=2\]"),
                                             ([2], ValueError, "ranks must have n=2"),
                                             ([2.0, 1.0], TypeError, "ranks must be"),
                                             (torch.tensor([1.0, 1.0]), TypeError, "ranks must be int32")])
def test_bad_ranks(ranks, exc, match):
    with pytest.raises(exc, match=match):
        multi_lora_linear(*_good(), ranks=ranks)


def test_segments_mismatch():
    x, w, b, a, bb, ids, s = _good()
    with pytest.raises(ValueError, match="built for 3 adapters but lora_a holds 2"):
        multi_lora_linear(x, w, b, a, bb, adapter_segments(ids, 3), s)
    with pytest.raises(ValueError, match="cover 5 tokens but x has 4"):
        multi_lora_linear(x, w, b, a, bb, adapter_segments(torch.zeros(5, dtype=torch.int64), 2), s)
    with pytest.raises(TypeError, match="n_adapters must be a positive int"):
        adapter_segments(ids, 0)


def test_direct_op_call_checks_in_cpp():
    x, w, b, a, bb, s, perm, offsets, _ = _op_args(_good())
    with pytest.raises(ValueError, match="lora_b must be"):
        torch.ops.lowrank.multi_lora_linear(x, w, b, a, bb[:, :2], s, perm, offsets, None)
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        torch.ops.lowrank.multi_lora_linear(x, w, b, a, bb, s, perm, torch.tensor([0, 3, 1]), None)
    with pytest.raises(ValueError, match="is not a token index"):
        torch.ops.lowrank.multi_lora_linear(x, w, b, a, bb, s, torch.tensor([0, 9, 1, 2]), torch.tensor([0, 2, 4]),
                                            None)
    with pytest.raises(ValueError, match=r"ranks\[1\] = 5 is outside"):
        torch.ops.lowrank.multi_lora_linear(x, w, b, a, bb, s, perm, offsets, torch.tensor([1, 5]))
    with pytest.raises(TypeError, match="perm must be int64"):
        torch.ops.lowrank.multi_lora_linear(x, w, b, a, bb, s, perm.int(), offsets, None)


_NO_AVX512_SCRIPT = """
import torch
from lowrank.ops import multi_lora_linear
from lowrank.reference import multi_lora_linear as reference
from tests.conftest import assert_grads_match_oracle, assert_matches_oracle
from tests.ops.test_multi_lora_linear import make_inputs
torch.manual_seed(0)
cases = [((3,), 64, 20, 2, 16), ((40,), 100, 47, 3, 3), ((101,), 33, 70, 4, 8), ((255,), 65, 17, 3, 17)]
cases = [(c, "mixed") for c in cases] + [(((301,), 67, 45, 3, 17), "runs"), (((2, 150), 40, 33, 2, 5), "runs")]
for dtype in (torch.float32, torch.bfloat16):
    for shape, pattern in cases:
        args = make_inputs(*shape, dtype, pattern=pattern)
        assert_matches_oracle(multi_lora_linear(*args, backend="cpp"), reference, args)
        for wrt in ([0, 1, 2, 3, 4], [3, 4], [0]):
            leaves = [a.detach().requires_grad_(i in wrt) for i, a in enumerate(args[:5])] + args[5:]
            y = multi_lora_linear(*leaves, backend="cpp")
            g = torch.randn_like(y)
            grads = torch.autograd.grad(y, [leaves[i] for i in wrt], g)
            assert_grads_match_oracle(grads, reference, args, g, wrt)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "avx512_bf16"])
def test_portable_and_avx512_paths_match_reference(isa):
    """LOWRANK_MAX_CPU_ISA=avx2: fp32 and bf16 on the ATen block-buffer path that AVX2-only CPUs take;
    =avx512_bf16: bf16 on the AVX512-BF16 dot / FMA kernels that CPUs without AMX (AMD Zen 4) take, and past 8
    tokens the backward's fused rank-r tail, on gathered rows (mixed ids) and in place on runs of consecutive tokens
    (one adapter per sequence), with odd segments and runs, 2 rank groups, gradient subsets."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LOWRANK_MAX_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", _NO_AVX512_SCRIPT], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_autocast_cpu_bf16():
    """Under torch.autocast("cpu", bf16) the op runs on bf16 casts of x, weight, bias and the factors (its
    autocast rule, like F.linear's; the per-adapter scaling is not cast) and the gradients reach fp32 leaves."""
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(*s, generator=gen) for s in ((40, 24), (16, 24), (16,), (3, 4, 24), (3, 16, 4))]
    ids = torch.randint(-1, 3, (40,), generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = multi_lora_linear(*leaves, ids, [0.5, 1.0, 2.0])
    want = multi_lora_linear(*[t.to(torch.bfloat16) for t in tensors], ids, [0.5, 1.0, 2.0])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
