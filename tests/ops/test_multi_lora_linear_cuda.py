"""lowrank::multi_lora_linear on CUDA (csrc/cuda/multi_lora_linear.cu): parity with the reference, backward, opcheck.

Forward: cuBLAS base + the SGMV shrink / expand kernels; shapes cross the 16-row, 16-rank and 64-column tiles
(T in 1, 3, 17, 255; r in 1, 16, 20; out = 70) with mixed, all -1 and per-adapter ranks. Needs a GPU; skips
without one (the kernels are compile-checked by tests/build on every machine).
"""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from lowrank.ops import adapter_segments, multi_lora_linear
from lowrank.reference import multi_lora_linear as reference
from tests.conftest import ALL_DTYPES, assert_grads_match_oracle, assert_matches_oracle
from tests.ops.test_multi_lora_linear import make_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine"),
]


def _cuda(args):
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((1,), 67, 70, 2, 1), ((3,), 67, 70, 3, 16), ((17,), 1000, 130, 4, 20),
                                   ((255,), 67, 70, 4, 16)], ids=str)
@pytest.mark.parametrize("pattern", ["mixed", "all_none"])
def test_forward_backward(dtype, shape, pattern):
    args = _cuda(make_inputs(*shape, dtype, pattern=pattern))
    ranks = [max(1, shape[-1] - i) for i in range(shape[-2])]
    y = multi_lora_linear(*args, ranks=ranks, backend="cuda")
    assert_matches_oracle(y, reference, args, {"ranks": ranks})
    leaves = [t.detach().requires_grad_(True) for t in args[:5]] + args[5:]
    y = multi_lora_linear(*leaves, backend="cuda")
    g = torch.randn_like(y)
    assert_grads_match_oracle(torch.autograd.grad(y, leaves[:5], g), reference, args, g, [0, 1, 2, 3, 4])


def test_opcheck():
    x, w, b, a, bb, ids, s = _cuda(make_inputs((9,), 17, 6, 3, 4, torch.float32))
    seg = adapter_segments(ids, 3)
    st = torch.tensor(s, dtype=torch.float64, device="cuda")
    opcheck(torch.ops.lowrank.multi_lora_linear.default, (x, w, b, a, bb, st, seg.perm, seg.offsets, None))
