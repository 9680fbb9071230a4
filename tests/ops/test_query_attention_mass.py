"""lowrank.ops.query_attention_mass against the reference (masked softmax of the query rows, column-summed).

The result is float32 (float64 for fp64 inputs) whatever the input dtype, so the tolerance rule is applied by hand
here: the reference run on the same (low-precision) input values, compared with the reference on those values
in float64, sets the bound. Parity with transformers' ``output_attentions`` on the real SmolLM2 weights is in
tests/rerank/test_llm_rerankers.py.
"""
import math

import pytest
import torch

import lowrank  # noqa: F401
from lowrank.ops import BackendUnavailableError, query_attention_mass
from lowrank.ops._backends import triton_reasons
from lowrank.reference import query_attention_mass as reference
from tests.conftest import ALL_DTYPES, ERROR_FACTOR

OPCHECK_OPS = {"query_attention_mass", "query_attention_mass_triton"}   # read by tests/test_registry.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = not triton_reasons(DEVICE)
BACKENDS = ["cpp" if DEVICE == "cpu" else "cuda", "torch"] + (["triton"] if TRITON_OK else [])
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="; ".join(triton_reasons(DEVICE)) or "triton can run")

# (B, Hq, Hkv, nq, n, d, offset or None = n - nq)
SHAPES = [(1, 1, 1, 1, 1, 1, None), (2, 3, 1, 3, 17, 8, None), (1, 9, 3, 17, 255, 64, None),
          (1, 4, 2, 5, 33, 17, 3), (3, 2, 2, 1, 3, 5, 0)]


def _make(B, Hq, Hkv, nq, n, d, dtype):
    g = torch.Generator().manual_seed(B * 131 + Hq * 17 + nq * 7 + n + d)
    q = torch.randn(B, Hq, nq, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, n, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return q, k


def _check(out, q, k, scale, offset):
    oracle = reference(q.double(), k.double(), scale, offset)
    low = reference(q, k, scale, offset)
    err_ref = (low.double() - oracle).abs().max().item() if low.numel() else 0.0
    eps = torch.finfo(low.dtype).eps
    bound = ERROR_FACTOR * max(err_ref, 4 * eps * max(oracle.abs().max().item() if oracle.numel() else 0.0, 1.0))
    assert out.dtype == low.dtype and out.shape == oracle.shape
    err = (out.double() - oracle).abs().max().item() if out.numel() else 0.0
    assert err <= bound, f"max error {err:.3e} exceeds bound {bound:.3e}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-nq{}-n{}-d{}-o{}".format(*s))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity(backend, dtype, shape):
    *dims, offset = shape
    if backend == "triton" and dims[4] * dims[1] > 17 * 9:
        pytest.skip("shape too large for the Triton interpreter")
    q, k = _make(*dims, dtype)
    off = k.shape[2] - q.shape[2] if offset is None else offset
    out = query_attention_mass(q, k, offset=offset, backend=backend)
    _check(out, q, k, 1 / math.sqrt(q.shape[3]), off)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_sum_to_one_and_causal(backend):
    q, k = _make(2, 4, 2, 5, 20, 16, torch.float32)
    out = query_attention_mass(q, k, scale=0.3, offset=7, backend=backend)
    torch.testing.assert_close(out.sum(-1), torch.full((2, 4), 5.0, device=DEVICE), rtol=1e-5, atol=1e-5)
    assert torch.all(out[..., 12:] == 0)             # after the last query row (position 11)
    assert torch.all(out[..., :8] > 0)               # every row sees the first 8 keys


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # [B, n, H, d] storage transposed to [B, H, n, d], as attention layers hold them
    q = torch.randn(2, 6, 4, 8, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 30, 2, 8, device=DEVICE).transpose(1, 2)
    out = query_attention_mass(q, k, backend=backend)
    torch.testing.assert_close(out, reference(q, k, 8 ** -0.5, 24), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    q, k = torch.randn(1, 2, 0, 4, device=DEVICE), torch.randn(1, 1, 5, 4, device=DEVICE)
    out = query_attention_mass(q, k, backend=backend)
    assert out.shape == (1, 2, 5) and torch.all(out == 0)
    q, k = torch.randn(0, 2, 1, 4, device=DEVICE), torch.randn(0, 1, 5, 4, device=DEVICE)
    assert query_attention_mass(q, k, backend=backend).shape == (0, 2, 5)


def test_not_differentiable():
    q, k = _make(1, 2, 1, 2, 5, 4, torch.float64)
    q.requires_grad_(True)
    out = query_attention_mass(q, k)
    assert not out.requires_grad


@pytest.mark.parametrize("op", ["query_attention_mass",
                                pytest.param("query_attention_mass_triton", marks=needs_triton)])
def test_opcheck(op):
    q, k = _make(1, 4, 2, 3, 11, 8, torch.float32)
    torch.library.opcheck(getattr(torch.ops.lowrank, op).default, (q, k, 0.25, 8))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(dynamic):
    q, k = _make(1, 4, 2, 3, 11, 8, torch.float32)

    def f(q, k):
        return query_attention_mass(q, k, scale=0.25, offset=8)

    torch.testing.assert_close(torch.compile(f, fullgraph=True, dynamic=dynamic)(q, k), f(q, k), rtol=0, atol=0)


def test_bad_input():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        query_attention_mass(q[0], k)
    with pytest.raises(ValueError, match="multiple of k's 3 heads"):
        query_attention_mass(q, torch.randn(1, 3, 10, 8))
    with pytest.raises(ValueError, match=r"k must be \[B=1, Hkv, n, d=8\]"):
        query_attention_mass(q, torch.randn(1, 2, 10, 7))
    with pytest.raises(ValueError, match=r"positions \[8, 11\) must lie within the 10 keys"):
        query_attention_mass(q, k, offset=8)
    with pytest.raises(ValueError, match="must lie within"):
        query_attention_mass(q, torch.randn(1, 2, 2, 8))
    with pytest.raises(TypeError, match="k has dtype torch.float64"):
        query_attention_mass(q, k.double())
    with pytest.raises(ValueError, match="scale must be finite"):
        query_attention_mass(q, k, scale=float("nan"))
    with pytest.raises(TypeError, match="offset must be an int"):
        query_attention_mass(q, k, offset=2.0)
    with pytest.raises(ValueError, match="k is on meta"):
        query_attention_mass(q, k.to("meta"))
    if DEVICE == "cpu":
        with pytest.raises(BackendUnavailableError, match="runs on cuda"):
            query_attention_mass(q, k, backend="cuda")
    with pytest.raises(ValueError, match="must lie within"):            # the C++ op checks too
        torch.ops.lowrank.query_attention_mass(q, k, 1.0, 9)


def test_cpp_under_inference_mode_with_threads():
    # the kernel's worker threads run ATen ops: they must inherit InferenceMode (regression: the output, an
    # inference tensor, was refused as an in-place target on every thread but the caller's)
    q, k = torch.randn(1, 6, 5, 8), torch.randn(1, 3, 40, 8)
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        with torch.inference_mode():
            got = query_attention_mass(q, k, scale=0.3, offset=35, backend="cpp")
    finally:
        torch.set_num_threads(old)
    want = reference(q.double(), k.double(), 0.3, 35)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
