"""Tile building blocks shared by the Triton kernels (``@triton.jit`` functions, inlined when compiled)."""
import triton
import triton.language as tl


@triton.jit
def dot_rows(acc, x_ptr, rows_x, mask_rows, stride_xk, m_ptr, rows_m, mask_cols, stride_mk, K,
             DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += X·Mᵀ over k < K for a [len(rows_x), len(rows_m)] tile: the K-loop of the LoRA-style GEMMs.

    X's rows start at ``x_ptr + rows_x`` and M's at ``m_ptr + rows_m`` (element offsets, int64), columns k at
    ``k·stride_xk`` / ``k·stride_mk``; masked rows/columns read zeros. The products run in DOT_DTYPE with IEEE
    precision (no TF32) and accumulate in ACC_DTYPE.
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x_tile = tl.load(x_ptr + rows_x[:, None] + kk[None, :] * stride_xk,
                         mask=mask_rows[:, None] & mask_k[None, :], other=0.0)
        m_t = tl.load(m_ptr + kk[:, None] * stride_mk + rows_m[None, :],  # Mᵀ tile [BLOCK_K, cols]
                      mask=mask_k[:, None] & mask_cols[None, :], other=0.0)
        acc = tl.dot(x_tile.to(DOT_DTYPE), m_t.to(DOT_DTYPE), acc, input_precision="ieee", out_dtype=ACC_DTYPE)
    return acc
