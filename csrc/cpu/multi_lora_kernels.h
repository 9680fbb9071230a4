// Segmented (SGMV-style) rank-r building blocks of the multi-adapter LoRA op on the CPU.
//
// Tokens are grouped by adapter once per batch (lowrank.ops.AdapterSegments): perm [T] lists the tokens sorted
// by adapter, and adapter a's tokens are perm[begin_a : end_a]. Row i of the rank-space buffers (H [rows, rmax],
// fp32, fp64 for fp64 inputs) belongs to token perm[i]. Every kernel reads or writes the token rows of x, y, g
// in place through perm: no gathered copy of the activations and no per-token copy of the adapter weights is
// ever made (PEFT gathers x[idx] and scatters result[idx] per adapter; vLLM's CPU fallback copies the weights
// per token).
//   segment_shrink:      H[i, k]  = s_a·Σ_j Z[perm[i], j]·M_a[k, j]       k < rank_a        (x·Aᵀ, g·B)
//   segment_expand_add_: Y[perm[i], :] += Σ_k H[i, k]·N_a[k, :]           k < rank_a        (h·Bᵀ, gB·A)
//   segment_tn:          O_a[k, :] = Σ_i H[i, k]·Z[perm[i], :]            i in segment a    (dA, dB)
// AMX tiles for bf16 where the CPU has them (cpu/multi_lora_amx.cpp); AVX-512 paths (bf16 with AVX512-BF16 dot
// products, fp32 with FMA; fp32 accumulation) are chosen at run time
// by CPUID (has_avx512_bf16(), capped by LOWRANK_MAX_CPU_ISA); elsewhere (AVX2-only CPUs, fp16, fp64) the same products run through ATen on
// a block buffer of at most kSegBlock gathered rows, so the portable path also never copies a whole activation.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace lowrank::cpu {

// One adapter's tokens: perm[begin:end] use `adapter` at rank `rank` (1 ≤ rank ≤ storage rank) with `scale`.
struct Segment {
  int64_t adapter, begin, end, rank;
  double scale;
};

// Rows of the portable path's gather buffer (the "small block buffer": 128 rows of x at most).
constexpr int64_t kSegBlock = 128;


// The non-empty segments (count ≥ 1, rank ≥ 1), after checking the metadata values: offsets non-decreasing
// from 0 to at most `tokens`, perm entries in [0, tokens), ranks in [0, r], scaling finite. CPU tensors only.
// `rows` receives offsets[n], the number of tokens that have an adapter.
std::vector<Segment> host_segments(const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& scaling,
                                   const std::optional<at::Tensor>& ranks, int64_t r, int64_t tokens,
                                   int64_t* rows);

// H [rows, rmax] in the accumulation dtype (fp32; fp64 for fp64 Z), zero outside the segments' [i, k < rank].
// Z [T, K]; m[s] is segment s's M [rank_s, K] (any strides; unit column stride is fastest).
at::Tensor segment_shrink(const at::Tensor& z2, const at::Tensor& perm, const std::vector<Segment>& segs,
                          const std::vector<at::Tensor>& m, int64_t rows, int64_t rmax);

// Y [T, Nout] += per token; H from segment_shrink; n[s] is segment s's N [rank_s, Nout] (any strides).
void segment_expand_add_(at::Tensor& y2, const at::Tensor& perm, const std::vector<Segment>& segs,
                         const at::Tensor& h, const std::vector<at::Tensor>& n);

// out[s] = Σ_i H[i, :rank_s]ᵀ·Z[perm[i], :] [rank_s, K] in the accumulation dtype, one per segment.
std::vector<at::Tensor> segment_tn(const at::Tensor& h, const at::Tensor& perm, const std::vector<Segment>& segs,
                                   const at::Tensor& z2);

// AMX-BF16 tile versions (cpu/multi_lora_amx.cpp), used by the three functions above for bf16 when the CPU has
// AMX (has_amx_bf16(), which implies has_avx512_bf16()): Z (shrink, tn) or Y (expand) bf16 with unit column stride.
bool segment_amx_supported(const at::Tensor& t);
void segment_shrink_amx(const at::Tensor& z2, const int64_t* perm, const std::vector<Segment>& segs,
                        const std::vector<at::Tensor>& m, at::Tensor& h);
void segment_expand_amx(at::Tensor& y2, const int64_t* perm, const std::vector<Segment>& segs, const at::Tensor& h,
                        const std::vector<at::Tensor>& n);
std::vector<at::Tensor> segment_tn_amx(const at::Tensor& h, const int64_t* perm, const std::vector<Segment>& segs,
                                       const at::Tensor& z2);

// The whole segmented rank-r update of the forward in one parallel pass, on AVX512-BF16 CPUs without the tile path
// (cpu/rank_avx512.cpp): y2[perm[i], :] += s_a·(x2[perm[i], :]·A_aᵀ)·B_aᵀ for the rows i of each segment a, with
// the tail's broadcast-dot kernels (bf16: VDPBF16PS, h rounded to bf16 as an unfused layer holds it; fp32: FMA).
// a[s]: A_a [rank_s, in] and bt[s]: B_aᵀ [rank_s, out] (any strides). Rows of a token block that are consecutive
// are read in place; others are gathered 8 at a time into an L1 buffer.
// Supported: the CPU has AVX512-BF16, x2 and y2 both bf16 or both fp32, 2-D with unit column strides.
bool segment_lora_avx512_supported(const at::Tensor& x2, const at::Tensor& y2);
void segment_lora_add_avx512(at::Tensor& y2, const at::Tensor& x2, const at::Tensor& perm,
                             const std::vector<Segment>& segs, const std::vector<at::Tensor>& a,
                             const std::vector<at::Tensor>& bt);

}  // namespace lowrank::cpu
