// Rank-r building blocks of the LoRA-style ops on the CPU, shared by every op that applies a thin factor:
//   shrink: H[t, k] = s · Σ_i X[t, i] · M[k, i]          X [T, K] (any float dtype), M [r, K], H [T, r] fp32
//   expand: Y[t, n] = bias[n] + Σ_k H[t, k] · N[k, n]     H [T, r] fp32, N [r, Nout], Y [T, Nout] in X's dtype
// Why expand is hand-written: with r ≈ 16 it is a K = 16 GEMM, a shape oneDNN/MKL run far below the memory floor
// (measured on this CPU: a bf16 2048×16×3072 addmm took 4.3–5.3 ms, 25% of the whole base GEMM). Here each output
// tile of 4 rows × 64 columns is accumulated in 16 AVX-512 registers over all r, so Y is written exactly once
// (measured 2.2 ms for that shape, page faults of the fresh output included). shrink is an N = r GEMM that
// oneDNN already runs at the memory floor, so it stays at::mm (a hand-tiled version measured 3× slower).
// The AVX-512 code is compiled with a function-level target attribute and chosen by the CPU's features at run
// time; without AVX-512 (or for fp16/fp64) ATen computes the same products.
#pragma once
#include <ATen/ATen.h>

namespace lowrank::cpu {

// fp32 [r, K_pad] copy of a [r, K] matrix (zero padded to a multiple of 16 columns), times `scale`.
at::Tensor pack_rows_f32(const at::Tensor& m, double scale = 1.0);

// H = scale · X · Mᵀ in fp32.  X [T, K] (row stride may differ from K), M [r, K].  Returns [T, r] fp32.
at::Tensor shrink(const at::Tensor& x2, const at::Tensor& m, double scale = 1.0);

// Y = bias + H · N, written into a new [T, Nout] tensor of `dtype`.  H [T, r] fp32 contiguous, N [r, Nout].
at::Tensor expand(const at::Tensor& h, const at::Tensor& n, const std::optional<at::Tensor>& bias,
                  at::ScalarType dtype);

}  // namespace lowrank::cpu
