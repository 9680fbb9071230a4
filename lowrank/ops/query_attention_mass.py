"""Query-row attention mass: column sums of the query rows of causal attention.

    mass[b, h, j] = Σ_i softmax_j( scale · q[b,h,i] · k[b, h//g, j] )    over keys j <= offset + i

Shapes: q [B, Hq, nq, d] (query row i sits at position offset + i), k [B, Hkv, n, d] for positions 0..n-1, with Hq
a multiple of Hkv (grouped-query attention, g = Hq / Hkv); mass [B, Hq, n] float32 (float64 for fp64 inputs).
It is ``attn_weights[:, :, offset:offset+nq].sum(2)`` of an ``output_attentions=True`` forward, which forms
(and returns) n×n weights per head and layer; here only nq rows exist, one block at a time. An attention-based
reranker (ICR) sums it over each document's span, heads and layers.

Ops (schemas in csrc/registration.cpp): ``lowrank::query_attention_mass`` (C++ CPU csrc/cpu/
query_attention_mass.cpp, CUDA csrc/cuda/query_attention_mass.cu) and ``lowrank::query_attention_mass_triton``
(lowrank/kernels/triton/query_attention_mass.py). Not differentiable: it is a scoring readout, and the function
reads detached inputs (documented, so a caller under autograd gets a constant, never a wrong gradient).
"""
from __future__ import annotations

import math

import torch

from lowrank.ops._backends import Backend, has_kernel, select, triton_reasons
from lowrank.reference import query_attention_mass as _reference

__all__ = ["query_attention_mass", "BACKENDS"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fake(q, k, scale, offset):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((q.shape[0], q.shape[1], k.shape[2]), dtype=acc)


torch.library.register_fake("lowrank::query_attention_mass")(_fake)
torch.library.register_fake("lowrank::query_attention_mass_triton")(_fake)


def _triton_probe(device_type: str) -> tuple[str, ...]:
    reasons = triton_reasons(device_type)
    if not reasons:
        import lowrank.kernels.triton.query_attention_mass  # noqa: F401  (registers the kernel)
    return reasons


BACKENDS: tuple[Backend, ...] = (
    Backend("cpp", ("cpu",), _FLOAT_DTYPES, torch.ops.lowrank.query_attention_mass,
            lambda d: has_kernel("lowrank::query_attention_mass", d)),
    Backend("cuda", ("cuda",), _FLOAT_DTYPES, torch.ops.lowrank.query_attention_mass,
            lambda d: has_kernel("lowrank::query_attention_mass", d)),
    Backend("triton", ("cuda", "cpu"), _FLOAT_DTYPES, torch.ops.lowrank.query_attention_mass_triton,
            _triton_probe),
    Backend("torch", ("cpu", "cuda"), _FLOAT_DTYPES, _reference),
)


def _validate_tensors(q, k) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"query_attention_mass: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"query_attention_mass: {name} must be 4-D [B, heads, tokens, d], "
                             f"got shape {tuple(t.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"query_attention_mass: q must be float32, float64, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"query_attention_mass: k has dtype {k.dtype} but q has dtype {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"query_attention_mass: k is on {k.device} but q is on {q.device}")
    B, Hq, nq, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"query_attention_mass: k must be [B={B}, Hkv, n, d={d}] to match q, got {tuple(k.shape)}")
    if k.shape[1] < 1 or Hq % k.shape[1]:
        raise ValueError(f"query_attention_mass: q's {Hq} heads must be a multiple of k's {k.shape[1]} heads")


def _validate_scalars(q, k, scale, offset) -> None:
    nq = q.shape[2]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"query_attention_mass: scale must be a Python float, got {type(scale).__name__}")
    if not abs(scale) < math.inf:
        raise ValueError(f"query_attention_mass: scale must be finite, got {scale}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"query_attention_mass: offset must be an int, got {type(offset).__name__}")
    if offset < 0 or offset + nq > k.shape[2]:
        raise ValueError(f"query_attention_mass: query rows at positions [{offset}, {offset + nq}) must lie within "
                         f"the {k.shape[2]} keys (offset >= 0, offset + nq <= n)")


def query_attention_mass(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, offset: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Attention mass from a block of query rows to every key, summed over the rows (causal softmax per row).

    .. math:: \\text{mass}_{b,h,j} = \\sum_i \\operatorname{softmax}_{j \\le o + i}(s\\, q_{b,h,i} \\cdot k_{b,h/g,j})

    Args:
        q: ``[B, Hq, nq, d]`` query states (after rotary embedding, as the attention layer uses them).
        k: ``[B, Hkv, n, d]`` key states of all n positions (cache included); ``Hq % Hkv == 0``.
        scale: the softmax scale; default ``1/sqrt(d)``.
        offset: position of the first query row; default ``n - nq`` (the rows are the last nq positions).
        backend: "auto" or one of "cpp", "cuda", "triton", "torch".

    Returns:
        ``[B, Hq, n]`` float32 (float64 for fp64 inputs): each row's softmax sums to 1, so the result sums to nq
        over j. Keys after every query row get 0. Not differentiable (inputs are read detached).
    """
    _validate_tensors(q, k)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3]) if q.shape[3] else 1.0
    if offset is None:
        offset = k.shape[2] - q.shape[2]
    _validate_scalars(q, k, scale, offset)
    impl = select("query_attention_mass", BACKENDS, backend, q.device, q.dtype)
    return impl.fn(q.detach(), k.detach(), float(scale), int(offset))
