"""lowrank.ops.gather_logits (identifier-logit gather) against the reference, under the conftest tolerance rule.

Every backend that can run here is tested: "cpp" and "torch" always, "triton" under the interpreter on CPU (tiny
shapes), "cuda" where a device exists. Parity covers float64/32/bf16/fp16, token counts 1, 3, 17, 255, odd d and V,
repeated ids, int32 and int64 ids, with and without bias; gradients, opcheck, fp64 gradcheck, torch.compile.
"""
import pytest
import torch

import lowrank  # noqa: F401  (registers torch.ops.lowrank)
from lowrank.ops import BackendUnavailableError, gather_logits
from lowrank.ops._backends import triton_reasons
from lowrank.reference import gather_logits as reference
from tests.conftest import ALL_DTYPES, assert_grads_match_oracle, assert_matches_oracle

OPCHECK_OPS = {"gather_logits", "gather_logits_triton"}   # read by tests/test_registry.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = not triton_reasons(DEVICE)
BACKENDS = ["cpp" if DEVICE == "cpu" else "cuda", "torch"] + (["triton"] if TRITON_OK else [])
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="; ".join(triton_reasons(DEVICE)) or "triton can run")

# (T, d, V, k): T in {1, 3, 17, 255}; d and V odd; k from 1 to more than V (repeats forced).
SHAPES = [(1, 1, 1, 1), (3, 17, 33, 3), (17, 33, 255, 20), (255, 3, 17, 40), (1, 576, 1000, 20)]


def _make(T, d, V, k, dtype, bias=True, id_dtype=torch.int64, requires_grad=False):
    g = torch.Generator().manual_seed(T * 7919 + d * 31 + V + k)
    hidden = torch.randn(T, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    weight = (torch.randn(V, d, generator=g, dtype=torch.float64) / d ** 0.5).to(DEVICE, dtype)
    ids = torch.randint(0, V, (k,), generator=g).to(DEVICE, id_dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(DEVICE, dtype) if bias else None
    if requires_grad:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    return [hidden, weight, ids, b]


def _small(shape, backend):
    # The interpreter is slow: keep triton to the shapes with few programs.
    return backend != "triton" or shape[0] * shape[3] <= 17 * 20


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-d{}-V{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity(backend, dtype, shape, bias):
    if not _small(shape, backend):
        pytest.skip("shape too large for the Triton interpreter")
    args = _make(*shape, dtype, bias)
    out = gather_logits(*args, backend=backend)
    assert_matches_oracle(out, reference, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_repeats_and_order(backend):
    hidden, weight, _, b = _make(3, 17, 33, 1, torch.float32)
    ids = torch.tensor([5, 0, 32, 5, 7], dtype=torch.int32, device=DEVICE)
    out = gather_logits(hidden, weight, ids, b, backend=backend)
    full = hidden @ weight.T + b
    torch.testing.assert_close(out, full[:, ids.long()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_strided_rows(backend):
    big = torch.randn(2, 5, 40, device=DEVICE)
    hidden = big[:, 1:4, 3:20]                   # [2, 3, 17], row stride 40: not contiguous
    weight = torch.randn(33, 17, device=DEVICE)
    ids = torch.tensor([1, 2, 30], device=DEVICE)
    out = gather_logits(hidden, weight, ids, backend=backend)
    assert out.shape == (2, 3, 3)
    torch.testing.assert_close(out, reference(hidden, weight, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    weight = torch.randn(9, 4, device=DEVICE)
    out = gather_logits(torch.randn(0, 4, device=DEVICE), weight, torch.tensor([1, 2], device=DEVICE), backend=backend)
    assert out.shape == (0, 2)
    out = gather_logits(torch.randn(3, 4, device=DEVICE), weight, torch.tensor([], dtype=torch.long, device=DEVICE),
                        backend=backend)
    assert out.shape == (3, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend, dtype):
    args = _make(17, 33, 40, 20, dtype, requires_grad=True)   # k=20 of V=40: repeated ids are likely
    out = gather_logits(*args, backend=backend)
    grad_out = torch.randn_like(out)
    wrt = [0, 1, 3]
    grads = torch.autograd.grad(out, [args[i] for i in wrt], grad_out)
    assert_grads_match_oracle(grads, reference, args, grad_out, wrt)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("op", ["gather_logits", pytest.param("gather_logits_triton", marks=needs_triton)])
def test_opcheck(op, bias, requires_grad):
    args = _make(3, 17, 33, 5, torch.float32, bias, requires_grad=requires_grad)
    torch.library.opcheck(getattr(torch.ops.lowrank, op).default, tuple(args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    hidden, weight, ids, b = _make(3, 5, 7, 4, torch.float64, requires_grad=True)

    def f(h, w, bb):
        return gather_logits(h, w, ids, bb, backend=backend)

    assert torch.autograd.gradcheck(f, (hidden, weight, b))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(dynamic):
    hidden, weight, ids, b = _make(3, 17, 33, 5, torch.float32, requires_grad=True)

    def f(h, w, i, bb):
        return gather_logits(h, w, i, bb)

    eager = f(hidden, weight, ids, b)
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)(hidden, weight, ids, b)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    g = torch.randn_like(eager)
    ge = torch.autograd.grad(eager, [hidden, weight, b], g)
    gc = torch.autograd.grad(compiled, [hidden, weight, b], g)
    for a, c in zip(ge, gc):
        torch.testing.assert_close(c, a)


def test_bad_input():
    h, w, ids = torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, V=10\)"):
        gather_logits(h, w, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"ids must lie in"):
        gather_logits(h, w, torch.tensor([-1]))
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        gather_logits(h, w, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="ids must be 1-D"):
        gather_logits(h, w, ids[None])
    with pytest.raises(ValueError, match=r"hidden.shape\[-1\] = 7 does not match weight"):
        gather_logits(torch.randn(3, 7), w, ids)
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        gather_logits(h, w.double(), ids)
    with pytest.raises(ValueError, match=r"bias must be \[V=10\]"):
        gather_logits(h, w, ids, torch.randn(9))
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        gather_logits([1.0], w, ids)
    with pytest.raises(TypeError, match="hidden must be float32"):
        gather_logits(h.long(), w.long(), ids)
    with pytest.raises(ValueError, match="weight is on meta"):
        gather_logits(h, w.to("meta"), ids)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        gather_logits(h, w, ids, backend="nope")
    if DEVICE == "cpu":
        with pytest.raises(BackendUnavailableError, match="runs on cuda, not cpu"):
            gather_logits(h, w, ids, backend="cuda")
    # the C++ op checks on its own too (direct torch.ops callers)
    with pytest.raises(IndexError, match="outside"):
        torch.ops.lowrank.gather_logits(h, w, torch.tensor([12]), None)


def test_inputs_not_modified():
    args = _make(5, 9, 11, 4, torch.float32)
    before = [a.clone() for a in args]
    gather_logits(*args)
    for a, b in zip(args, before):
        assert torch.equal(a, b)
