// Multi-adapter LoRA linear (SGMV / BGMV semantics), CPU.
//   forward:  y_t = x_t·Wᵀ + b + s_a·(x_t·A_aᵀ)·B_aᵀ     a = adapter of token t (none: base only)
//             x [T, in], W [out, in], A [n, r, in], B [n, out, r], s [n]; adapter a uses its first rank_a ranks
//   backward: gB_t = s_a·g_t·B_a;  dx_t = g_t·W + gB_t·A_a;  dW = gᵀ·x;  dA_a = Σ_{t∈a} gB_tᵀ·x_t;
//             dB_a = Σ_{t∈a} g_tᵀ·(s_a·x_t·A_aᵀ);  adapters without tokens get zero gradients.
// The tokens arrive grouped by adapter (perm, offsets: lowrank.ops.AdapterSegments, built once per batch and
// shared by every layer). Order of work in the forward, and why:
//   1. the base GEMM over all tokens in their own order writes a fresh output once, with the bias in its
//      epilogue (oneDNN for bf16, as lora_linear does; the fused AVX512-BF16 pass for 1–4 bf16 tokens, where one
//      dispatcher call and one read of W are what decode costs);
//   2. per segment, H = s_a·x[perm]·A_aᵀ reads the rows of x through perm (cpu/multi_lora_kernels.h; bf16 on AMX
//      tiles, 16 tokens per A tile, read in place when they are consecutive rows);
//   3. per segment, y[perm] += H·B_aᵀ adds into the base output in place (AMX C tiles for bf16, else a 4-row ×
//      64-column AVX-512 register tile).
//   bf16 with AVX512-BF16 but no AMX fuses 2 and 3: per block of 8 tokens of a segment, h on VDPBF16PS and at once
//   y += h·Bᵀ (cpu::segment_lora_add_avx512), h never leaving L1.
// No gathered copy of x, no output-sized temporary, and no per-token copy of any adapter's weights; the only
// per-call copies are the active adapters' factors repacked for the tiles (bf16 VNNI pairs on AMX, fp32 rows of B
// for the AVX-512 expand: r × (in + out) elements per adapter) and 16-row gather scratches.
// The backward reuses the same three building blocks: dx is a base GEMM plus a segmented expand of gB·A, dA and
// dB are segmented reductions over each adapter's tokens (zero for adapters that have none). Without AMX (and for
// fp32) past 8 tokens it is instead lora_linear's fused tail for all adapters in one pass, on runs of consecutive
// tokens read in place (or on x and g gathered into the segment order when ids are mixed token by token).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <array>
#include <cstring>
#include <tuple>

#include "common/multi_lora_common.h"
#include "cpu/lowrank_kernels.h"
#include "cpu/multi_lora_kernels.h"

namespace lowrank {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::Tensor base_linear(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t T = x2.size(0);
  const auto dtype = x2.scalar_type();
  if (cpu::has_avx512_bf16() && dtype == at::kBFloat16 && T <= cpu::fused_decode_max_tokens() &&
      cpu::decode_supported(x2, weight))
    return cpu::decode_linear_bf16(x2, weight, bias, std::nullopt, std::nullopt, at::kBFloat16);
  const bool onednn = cpu::onednn_linear_op() != nullptr && cpu::has_avx512_bf16() && weight.is_contiguous() && T > 0 &&
                      (dtype == at::kBFloat16 ||
                       (dtype == at::kFloat && T >= 2 && T <= 64 && weight.numel() >= (int64_t{1} << 22)));
  if (onednn) return cpu::onednn_linear(x2, weight, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  return has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
}

// out[i, :] = src[idx[i], :] (gather) or dst[idx[i], :] = src[i, :] (scatter) for 2-D rows with unit column
// stride, one memcpy a row in one parallel region (ATen's index_select took 1.5 ms for 2048 rows of 768 bf16
// here, ten times a copy).
void copy_rows(const at::Tensor& src, at::Tensor& dst, const int64_t* idx, int64_t n, bool gather) {
  const int64_t bytes = src.size(1) * src.element_size(), lds = src.stride(0) * src.element_size(),
                ldd = dst.stride(0) * dst.element_size();
  const auto* S = static_cast<const char*>(src.const_data_ptr());
  auto* D = static_cast<char*>(dst.mutable_data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      if (gather) {
        std::memcpy(D + i * ldd, S + idx[i] * lds, bytes);
      } else {
        std::memcpy(D + idx[i] * ldd, S + i * lds, bytes);
      }
    }
  });
}
at::Tensor gather_rows(const at::Tensor& src, const int64_t* idx, int64_t n) {
  at::Tensor out = at::empty({n, src.size(1)}, src.options());
  copy_rows(src, out, idx, n, true);
  return out;
}

// The backward reads an adapter's tokens in place when they come in runs of consecutive tokens at least this long
// on average (shorter runs make short tail panels; then one gather into the segment order is cheaper).
constexpr int64_t kMinRun = 32;

// Rows with unit column stride (the AVX-512 kernels read rows through perm); a copy only for odd layouts.
at::Tensor unit_cols(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// Per segment: A_a [rank, in] and B_a [out, rank] as views of the padded storage.
std::vector<at::Tensor> a_rows(const at::Tensor& lora_a, const std::vector<cpu::Segment>& segs) {
  std::vector<at::Tensor> out;
  for (const auto& g : segs) out.push_back(lora_a.select(0, g.adapter).narrow(0, 0, g.rank));
  return out;
}
std::vector<at::Tensor> bt_rows(const at::Tensor& lora_b, const std::vector<cpu::Segment>& segs) {
  std::vector<at::Tensor> out;
  for (const auto& g : segs) out.push_back(lora_b.select(0, g.adapter).narrow(1, 0, g.rank).t());
  return out;
}

at::Tensor multi_lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
                                 const at::Tensor& perm, const at::Tensor& offsets,
                                 const std::optional<at::Tensor>& ranks) {
  check_multi_lora_args(x, weight, bias, lora_a, lora_b, scaling, perm, offsets, ranks);
  const auto in = weight.size(1), out = weight.size(0), r = lora_a.size(1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  const at::Tensor x2 = unit_cols(x.reshape({-1, in}));
  int64_t rows = 0;
  const auto segs = cpu::host_segments(perm, offsets, scaling, ranks, r, x2.size(0), &rows);
  at::Tensor y = base_linear(x2, weight, bias);
  if (!segs.empty()) {
    if (y.stride(1) != 1) y = y.contiguous();  // GEMM outputs are row-major: never copies
    const at::Tensor pm = perm.contiguous();
    if (x2.scalar_type() == at::kBFloat16 && x2.size(0) > cpu::fused_decode_max_tokens() &&
        !cpu::segment_amx_supported(x2) && cpu::segment_lora_avx512_supported(x2, y)) {
      // bf16 with AVX512-BF16 but no AMX: shrink and expand of each block of a segment's tokens in one pass on
      // VDPBF16PS (the separate segmented kernels use fp32 FMAs with masked loads on bf16 and round-trip H through
      // memory: 1.0 ms of rank-16 work at 2048×768×768 where the GEMM takes 6.5; now 0.75). Not fp32: its FMA
      // twin, fine in the backward, left MiniLM's 6-layer forward 2.7× PEFT's error from fp64 (the segmented fp32
      // kernels stay within the repo's 2× rule).
      cpu::segment_lora_add_avx512(y, x2, pm, segs, a_rows(lora_a, segs), bt_rows(lora_b, segs));
    } else {
      const at::Tensor h = cpu::segment_shrink(x2, pm, segs, a_rows(lora_a, segs), rows, r);
      cpu::segment_expand_add_(y, pm, segs, h, bt_rows(lora_b, segs));
    }
  }
  return y.view(out_shape);
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> multi_lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scaling, const at::Tensor& perm, const at::Tensor& offsets,
    const std::optional<at::Tensor>& ranks, std::array<bool, 4> output_mask) {
  check_multi_lora_args(x, weight, std::nullopt, lora_a, lora_b, scaling, perm, offsets, ranks);
  check_multi_lora_grad(grad_out, x, weight);
  const auto in = weight.size(1), out = weight.size(0), r = lora_a.size(1);
  const at::Tensor g2 = unit_cols(grad_out.reshape({-1, out}));
  const at::Tensor x2 = unit_cols(x.reshape({-1, in}));
  int64_t rows = 0;
  const auto segs = cpu::host_segments(perm, offsets, scaling, ranks, r, x2.size(0), &rows);
  const at::Tensor pm = perm.contiguous();
  OptTensor dx, dw, da, db;
  if (!segs.empty() && x2.size(0) > cpu::fused_decode_max_tokens() && !cpu::segment_amx_supported(x2) &&
      cpu::tail_avx512_supported(x2, lora_a.select(0, 0)) && cpu::tail_avx512_supported(g2, lora_b.select(0, 0))) {
    // bf16 with AVX512-BF16 but no AMX, and fp32, past the few-token pass: every adapter's rank-r products
    // (dx += gB·A, dA, dB) are lora_linear's fused tail (cpu/rank_avx512.cpp), all adapters in one parallel pass.
    // The tail reads consecutive rows, so: where each adapter's tokens come in long runs of consecutive tokens (a
    // sequence per adapter, the usual batch), the runs are read in place and dx = g·W takes the update in place;
    // otherwise x and g are gathered into the segment order once (dx = g·W with them, then scattered back): four
    // copies of [rows, K] that cost ~1 ms at 2048×768 bf16, a sixth of the GEMM. (The segmented kernels below read
    // rows through perm with fp32 FMAs and masked loads: 6 ms of rank-r work at 512 tokens of 4096², ~8× the tail.)
    const int64_t* idx = pm.const_data_ptr<int64_t>();
    std::vector<cpu::TailPiece> runs;
    for (size_t s = 0; s < segs.size(); ++s)
      for (int64_t i = segs[s].begin; i < segs[s].end;) {
        int64_t j = i + 1;
        while (j < segs[s].end && idx[j] == idx[j - 1] + 1) ++j;
        runs.push_back({static_cast<int64_t>(s), idx[i], j - i});
        i = j;
      }
    const bool in_place = static_cast<int64_t>(runs.size()) * kMinRun <= rows;
    const std::vector<at::Tensor> fa = a_rows(lora_a, segs);
    std::vector<at::Tensor> fb, da_v, db_v;
    std::vector<double> fs;
    at::Tensor dat = output_mask[2] ? at::zeros_like(lora_a, at::MemoryFormat::Contiguous) : at::Tensor();
    at::Tensor dbt = output_mask[3] ? at::zeros_like(lora_b, at::MemoryFormat::Contiguous) : at::Tensor();
    for (const auto& sg : segs) {
      fb.push_back(lora_b.select(0, sg.adapter).narrow(1, 0, sg.rank));
      fs.push_back(sg.scale);
      if (output_mask[2]) da_v.push_back(dat.select(0, sg.adapter).narrow(0, 0, sg.rank));
      if (output_mask[3]) db_v.push_back(dbt.select(0, sg.adapter).narrow(1, 0, sg.rank));
    }
    auto* pda = output_mask[2] ? &da_v : nullptr;
    auto* pdb = output_mask[3] ? &db_v : nullptr;
    at::Tensor base = output_mask[0] ? at::mm(g2, weight).contiguous() : at::Tensor();
    if (in_place) {
      cpu::lora_backward_tail_multi_avx512(output_mask[0] ? &base : nullptr, x2, g2, fa, fb, fs, runs, pda, pdb);
    } else {
      const at::Tensor xp = gather_rows(x2, idx, rows), gp = gather_rows(g2, idx, rows);
      at::Tensor dxp = output_mask[0] ? gather_rows(base, idx, rows) : at::Tensor();
      std::vector<cpu::TailPiece> pieces;
      for (size_t s = 0; s < segs.size(); ++s)
        pieces.push_back({static_cast<int64_t>(s), segs[s].begin, segs[s].end - segs[s].begin});
      cpu::lora_backward_tail_multi_avx512(output_mask[0] ? &dxp : nullptr, xp, gp, fa, fb, fs, pieces, pda, pdb);
      if (output_mask[0]) copy_rows(dxp, base, idx, rows, false);
    }
    if (output_mask[1]) dw = at::mm(g2.t(), x2);
    return {output_mask[0] ? OptTensor(base.view(x.sizes())) : OptTensor(), dw,
            output_mask[2] ? OptTensor(dat) : OptTensor(), output_mask[3] ? OptTensor(dbt) : OptTensor()};
  }
  at::Tensor gb;  // s_a·g·B_a [rows, r] in the segment order, shared by dx and dA
  if ((output_mask[0] || output_mask[2]) && !segs.empty())
    gb = cpu::segment_shrink(g2, pm, segs, bt_rows(lora_b, segs), rows, r);
  if (output_mask[0]) {
    // bf16, 1–8 tokens, no AMX: g·W as one pass over W in fp32 (cpu::decode_nn_bf16; oneDNN's GEMM of this form
    // runs at a third of the memory floor on Zen 4), the rank-r add in fp32 and one rounding.
    const bool nn = !cpu::has_amx_bf16() && x2.scalar_type() == at::kBFloat16 && cpu::decode_nn_supported(g2, weight);
    at::Tensor d = nn ? cpu::decode_nn_bf16(g2, weight) : at::mm(g2, weight);
    if (gb.defined()) cpu::segment_expand_add_(d, pm, segs, gb, a_rows(lora_a, segs));
    dx = (nn ? d.to(at::kBFloat16) : d).view(x.sizes());
  }
  if (output_mask[1]) dw = at::mm(g2.t(), x2);
  if (output_mask[2]) {
    at::Tensor d = at::zeros_like(lora_a, at::MemoryFormat::Contiguous);
    const auto parts = cpu::segment_tn(gb, pm, segs, x2);
    for (size_t s = 0; s < segs.size(); ++s) d.select(0, segs[s].adapter).narrow(0, 0, segs[s].rank).copy_(parts[s]);
    da = d;
  }
  if (output_mask[3]) {
    at::Tensor d = at::zeros_like(lora_b, at::MemoryFormat::Contiguous);
    if (!segs.empty()) {
      const at::Tensor h = cpu::segment_shrink(x2, pm, segs, a_rows(lora_a, segs), rows, r);
      const auto parts = cpu::segment_tn(h, pm, segs, g2);  // [rank, out] each
      for (size_t s = 0; s < segs.size(); ++s)
        d.select(0, segs[s].adapter).narrow(1, 0, segs[s].rank).copy_(parts[s].t());
    }
    db = d;
  }
  return {dx, dw, da, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_cpu);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cpu);
}

}  // namespace lowrank
