"""lowrank.ops.multi_lora_linear(..., backend="triton") against the reference (conftest tolerance rule).

Without CUDA the kernels run on CPU tensors under the Triton interpreter (root conftest sets TRITON_INTERPRET=1),
which is slow: tiny shapes and a covering sample of cases. Backward goes through the C++ backward op.
"""
import pytest
import torch
from torch.library import opcheck

import lowrank  # noqa: F401
from lowrank.ops import adapter_segments, multi_lora_linear
from lowrank.ops._backends import triton_reasons
from lowrank.reference import multi_lora_linear as reference
from tests.conftest import ALL_DTYPES, assert_grads_match_oracle, assert_matches_oracle
from tests.ops.test_multi_lora_linear import make_inputs

OPCHECK_OPS = {"multi_lora_linear_triton"}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASONS = triton_reasons(DEVICE)
pytestmark = pytest.mark.skipif(bool(_REASONS), reason="; ".join(_REASONS) or "triton can run")

# (lead, in, out, n, r, pattern): odd token counts, one adapter, all -1, rank 1, several tiles in every loop.
CASES = [((1,), 3, 5, 1, 1, "one"), ((3,), 17, 33, 2, 3, "mixed"), ((17,), 33, 17, 3, 16, "mixed"),
         ((5,), 9, 7, 2, 2, "all_none"), ((2, 9), 40, 35, 4, 20, "no_none")]


def _on(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parity(dtype, case):
    *shape, pattern = case
    args = _on(make_inputs(*shape, dtype, pattern=pattern))
    assert_matches_oracle(multi_lora_linear(*args, backend="triton"), reference, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ranks_and_backward(dtype):
    x, w, b, a, bb, ids, s = args = _on(make_inputs((13,), 20, 18, 3, 8, dtype))
    ranks = [8, 1, 5]
    y = multi_lora_linear(*args, ranks=ranks, backend="triton")
    assert_matches_oracle(y, reference, args, {"ranks": ranks})
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, a, bb)]
    y = multi_lora_linear(*leaves, ids, s, backend="triton")
    g = torch.randn_like(y)
    assert_grads_match_oracle(torch.autograd.grad(y, leaves, g), reference, args, g, [0, 1, 2, 3, 4])


def test_opcheck():
    x, w, b, a, bb, ids, s = _on(make_inputs((6,), 9, 7, 3, 4, torch.float32))
    seg = adapter_segments(ids, 3)
    st = torch.tensor(s, dtype=torch.float64, device=DEVICE)
    opcheck(torch.ops.lowrank.multi_lora_linear_triton.default,
            (x, w, b, a, bb, st, seg.perm, seg.offsets, torch.tensor([4, 2, 1], device=DEVICE)))
