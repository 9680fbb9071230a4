// Fused LoRA linear, CPU.
//   forward:  y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ        x [T, in], W [out, in], A [r, in], B [out, r]
//   backward: gB = s·(g·B);  dx = g·W + gB·A;  dW = gᵀ·x;  dA = gBᵀ·x;  dB = gᵀ·(s·x·Aᵀ)
// Packed layout (LoRALinear's default for bf16: W and B the column blocks of one [out, in + r] buffer,
// cpu::joint_weight): on AVX512-BF16/AMX CPUs the bf16 layer is x'·[W | B]ᵀ with x' = [x | s·x·Aᵀ], one oneDNN
// GEMM (≥ 17 tokens) or one AMX pass over the weights (4–16 tokens). bf16 backward on AMX (any layout): past 16
// tokens the GEMM g·W writes dx and one fused pass over token panels forms gB, h, dA, dB and dx += gB·A
// (cpu/rank_amx.cpp); up to 16 tokens g·[W | B] is one tile pass over the weights. bf16 backward with AVX512-BF16
// but no AMX: up to 8 tokens g·[W | B] (or g·W) is one pass over the weights (cpu::decode_nn_bf16); past that the
// GEMM g·W, then the same fused tail on AVX512-BF16 dot products (cpu/rank_avx512.cpp). Unpacked layouts, fp32, fp64:
// Order of work in the forward, and why: the base GEMM writes a fresh output once with the bias in its epilogue
// (oneDNN where that is measured faster, else F.linear's addmm), h = s·x·Aᵀ is one skinny GEMM that reads x
// once, and s·h·Bᵀ is then added in a single register-tiled pass over the output (cpu/lowrank_kernels.h). With
// B = 0 the update adds exact zeros, so a fresh LoRALinear reproduces its Linear bit for bit, except where the base
// GEMM is not the one F.linear uses (fp32 at 2–64 tokens of large weights on Intel, and off Intel under
// float32_matmul_precision "high"/"medium": oneDNN, on AMX under "high"/"medium" from 1024 tokens: bf16x3, which
// is ~1e-5 relative from fp32; bf16 at 1–3 tokens: the fused decode pass), which sum in another order. No output-sized temporary is allocated, and the whole layer is one
// dispatcher call, which is what decode (few tokens) is bound by. fp64 (the gradcheck dtype) runs the same steps
// on ATen's double GEMMs (cpu/lowrank_kernels.h keeps its intermediates in fp64).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include "common/lora_linear_common.h"
#include "cpu/isa.h"
#include "cpu/lowrank_kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace lowrank {
namespace {

// oneDNN's linear (mkldnn::_linear_pointwise with a plain dense weight): the bias is added in the GEMM's fp32
// epilogue, so the result is bit-identical to F.linear in bf16, and no output-sized bias fill precedes the GEMM.
// Measured against F.linear on an Intel Xeon (AVX512-BF16, AMX): bf16 0.87–0.88× at 2048×768×{768,3072}, 0.99× at
// 512/8×4096×4096; fp32 0.62–0.84× at 8–64 tokens of 4096×4096 (MKL's sgemm is slow there), but slower elsewhere.
// On an AMD EPYC (AVX2), fp32, where MKL does not run its best kernels: 0.57–0.87× at every shape of issue 2's
// table, 1 thread (0.35–0.88× at 2 threads); but there oneDNN's fp32 sums are less accurate (mean error 1.3–1.8×,
// max up to 3× MKL's against fp64), so off Intel fp32 takes oneDNN only when the user has allowed faster, less
// exact fp32 matmuls with torch.set_float32_matmul_precision("high" or "medium"); the default ("highest") keeps
// F.linear's GEMM and its exact results.
bool use_onednn_base(const at::Tensor& x2, const at::Tensor& weight) {
  // A strided weight (the W block of LoRALinear's joint buffer) would be copied into a contiguous one on every
  // call; at::mm/addmm read it in place (leading dimension = row stride).
  if (cpu::onednn_linear_op() == nullptr || !weight.is_contiguous()) return false;
  if (x2.scalar_type() == at::kBFloat16) return cpu::has_avx512_bf16();
  if (x2.scalar_type() != at::kFloat) return false;
  if (!cpu::is_intel_cpu()) {
    return at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
  }
  const int64_t T = x2.size(0);
  return cpu::has_avx512_bf16() && T >= 2 && T <= 64 && weight.numel() >= (int64_t{1} << 22);
}

// fp32 under float32_matmul_precision "high" or "medium" on AMX, from this many tokens: the base GEMM is bf16x3
// (x and W as sums of two bf16 numbers, three tile products, fp32 sums: what torch documents "high" to allow),
// ~2× faster than MKL's sgemm. W is split and packed per call (a pass over it plus a fresh buffer of its size:
// ~1.8 ns a weight, measured 30 ms for 4096², which made 512×4096² 1.15× the Linear); the GEMM saves ~3.3 ps a
// weight per token, so the break-even is ~550 tokens.
constexpr int64_t kBf16x3MinT = 1024;

bool use_bf16x3_base(const at::Tensor& x2) {
  return x2.scalar_type() == at::kFloat && x2.size(0) >= kBf16x3MinT && cpu::bf16x3_supported() &&
         at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
}

// y = x·Wᵀ + b with beta = 0 (a fresh output, written once).
at::Tensor base_linear(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (use_bf16x3_base(x2)) return cpu::bf16x3_linear(x2, weight, bias);
  if (use_onednn_base(x2, weight)) return cpu::onednn_linear(x2, weight, bias);
  return has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
}

// From this many tokens (to 16) a packed layer runs on the AMX skinny kernel (cpu/skinny_amx.cpp); measured
// 4096², bf16, against F.linear: 0.89× at 4 tokens (the decode pass: 0.97×), 0.91× at 8 (1.20×), 1.03× at 16;
// at 1 token the decode pass is faster (0.59× vs 0.70×).
constexpr int64_t kSkinnyMinT = 4;
// Up to this many tokens the backward, too, is one pass over the weights on tiles (and its rank-r work is small).
constexpr int64_t kSkinnyMaxT = 16;

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling) {
  check_lora_linear_args(x, weight, bias, lora_a, lora_b);
  const auto in = weight.size(1), out = weight.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  const at::Tensor x2 = x.reshape({-1, in});
  const bool lora = x2.size(0) > 0 && scaling != 0.0;
  const at::Tensor wj = lora ? cpu::joint_weight(weight, lora_b) : at::Tensor();
  if (wj.defined() && x2.size(0) >= kSkinnyMinT && cpu::augment_supported(x2, lora_a) &&
      cpu::skinny_supported(x2.size(0), wj)) {
    // Joint layout, 4–16 tokens, AMX: the layer is one pass over [W | B] on the tile unit.
    return cpu::skinny_linear_amx(cpu::augment_bf16(x2, lora_a, scaling), wj, bias).view(out_shape);
  }
  const bool decode = lora && cpu::decode_supported(x2, lora_a) && lora_b.stride(1) == 1;
  if (decode && x2.size(0) <= cpu::fused_decode_max_tokens()) {
    // Decode: u = s·x·Aᵀ (rounded to bf16, as the unfused layer's h is), then bias + x·Wᵀ + u·Bᵀ in one pass.
    const at::Tensor u = cpu::decode_linear_bf16(x2, lora_a, std::nullopt, std::nullopt, std::nullopt, at::kFloat)
                             .mul_(scaling)
                             .to(at::kBFloat16);
    return cpu::decode_linear_bf16(x2, weight, bias, u, lora_b, at::kBFloat16).view(out_shape);
  }
  if (wj.defined() && cpu::onednn_linear_op() != nullptr && cpu::augment_supported(x2, lora_a)) {
    // Joint layout (LoRALinear.pack_()): [x | s·x·Aᵀ]·[W | B]ᵀ is the whole layer as one GEMM of K + r, so the
    // rank-r expand runs inside oneDNN's micro-kernel instead of as a separate pass over the output.
    return base_linear(cpu::augment_bf16(x2, lora_a, scaling), wj, bias).view(out_shape);
  }
  at::Tensor y = base_linear(x2, weight, bias);
  if (lora) {
    // A few tokens: the rank-r shrink through at::mm costs ~130 µs of oneDNN call overhead, more than its work.
    const at::Tensor h = decode ? cpu::decode_linear_bf16(x2, lora_a, std::nullopt, std::nullopt, std::nullopt,
                                                          at::kFloat).mul_(scaling)
                                : cpu::shrink(x2, lora_a, scaling);
    cpu::expand_add_(y, h, lora_b.t(), std::nullopt);
  }
  return y.view(out_shape);
}

// Same math as lora_linear_backward_aten. bf16 on AMX: see below. Elsewhere dx is a beta = 0 base GEMM followed by
// the register-tiled rank-r add, as in the forward; the reductions over tokens (dA = gBᵀ·x, dB = gᵀ·h) and the
// base GEMMs stay with ATen.
std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, std::array<bool, 4> output_mask) {
  check_lora_linear_args(x, weight, std::nullopt, lora_a, lora_b);
  check_lora_linear_grad(grad_out, x, weight);
  const auto in = weight.size(1), out = weight.size(0);
  const auto dtype = x.scalar_type();
  const at::Tensor g2 = grad_out.reshape({-1, out});
  const at::Tensor x2 = x.reshape({-1, in});
  OptTensor dx, dw, da, db;
  // (oneDNN runs the rank-r products, N = 16 / M = 16 GEMMs, at a few tens of GFLOP/s: hence the tiles.)
  const bool amx = dtype == at::kBFloat16 && cpu::rank_amx_supported(g2, lora_b) && cpu::rank_amx_supported(x2, lora_a);
  // The base GEMM g·W writes dx, then one fused pass over token panels adds gB·A into it and forms dA and dB.
  using Tail = void (*)(at::Tensor*, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        double, at::Tensor*, at::Tensor*);
  auto fused_tail = [&](Tail tail) -> std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> {
    at::Tensor base, dat, dbt;
    if (output_mask[0]) base = at::mm(g2, weight).contiguous();
    tail(output_mask[0] ? &base : nullptr, x2, g2, lora_a, lora_b, scaling, output_mask[2] ? &dat : nullptr,
         output_mask[3] ? &dbt : nullptr);
    return {output_mask[0] ? OptTensor(base.view(x.sizes())) : OptTensor(),
            output_mask[1] ? OptTensor(at::mm(g2.t(), x2)) : OptTensor(),
            output_mask[2] ? OptTensor(dat) : OptTensor(), output_mask[3] ? OptTensor(dbt) : OptTensor()};
  };
  // bf16 on AMX past 16 tokens: the tail on tiles (cpu/rank_amx.cpp).
  if (amx && g2.size(0) > kSkinnyMaxT) return fused_tail(&cpu::lora_backward_tail_amx);
  if (amx) {
    // Up to 16 tokens the step is one pass over the weights: g·[W | B] (joint layout: the shrink of g comes with
    // it) or g·W on tiles as (gᵀ)ᵀ·W (oneDNN: ~2× longer); the rank-r products are separate small tile calls.
    const at::Tensor wj = cpu::joint_weight(weight, lora_b);
    const at::Tensor wsrc = wj.defined() ? wj : weight;
    at::Tensor gb;  // s·(g·B) [T, r] fp32
    if (output_mask[0]) {
      const at::Tensor d = wsrc.stride(1) == 1 ? cpu::tn_amx(g2.t(), wsrc, 1.0) : at::mm(g2, wsrc).to(at::kFloat);
      gb = wj.defined() ? at::mul(d.narrow(1, in, lora_a.size(0)), scaling).contiguous()
                        : cpu::shrink_amx(g2, lora_b.t(), scaling);
      at::Tensor out = at::empty({g2.size(0), in}, d.options());
      cpu::expand_add_out(out, d.narrow(1, 0, in), gb, lora_a, std::nullopt);
      dx = out.to(dtype).view(x.sizes());
    } else if (output_mask[2]) {
      gb = cpu::shrink_amx(g2, lora_b.t(), scaling);
    }
    if (output_mask[1]) dw = at::mm(g2.t(), x2);
    if (output_mask[2]) da = cpu::tn_amx(gb.to(dtype), x2, 1.0).to(dtype);
    if (output_mask[3]) {
      const at::Tensor h = cpu::shrink_amx(x2, lora_a, scaling).to(dtype);
      db = cpu::tn_amx(h, g2, 1.0).t().to(dtype).contiguous();
    }
    return {dx, dw, da, db};
  }
  at::Tensor gb;  // s·(g·B) in fp32 (fp64 for fp64) [T, r], shared by dx and dA
  if (output_mask[0] && dtype == at::kBFloat16) {
    // bf16, up to 8 tokens, no AMX: g·W (g·[W | B] in the joint layout, which brings the shrink of g with it) is
    // one pass over the weights summed in fp32 (cpu::decode_nn_bf16), where oneDNN's GEMM of this form runs at a
    // third of the memory floor; dx is rounded once, after the rank-r add.
    const at::Tensor wj = cpu::joint_weight(weight, lora_b);
    const at::Tensor wsrc = wj.defined() ? wj : weight;
    if (cpu::decode_nn_supported(g2, wsrc)) {
      const at::Tensor d = cpu::decode_nn_bf16(g2, wsrc);
      gb = wj.defined() ? at::mul(d.narrow(1, in, lora_a.size(0)), scaling).contiguous()
                        : cpu::shrink(g2, lora_b.t(), scaling);
      at::Tensor acc = at::empty({g2.size(0), in}, d.options());
      cpu::expand_add_out(acc, d.narrow(1, 0, in), gb, lora_a, std::nullopt);
      dx = acc.to(dtype).view(x.sizes());
    }
  }
  if (!dx.has_value() && cpu::tail_avx512_supported(g2, lora_b) && cpu::tail_avx512_supported(x2, lora_a)) {
    // bf16 without AMX past the few-token pass, and fp32: the same tail on AVX-512 (cpu/rank_avx512.cpp; VDPBF16PS
    // or FMA) instead of five oneDNN / MKL calls.
    return fused_tail(&cpu::lora_backward_tail_avx512);
  }
  if (!gb.defined() && (output_mask[0] || output_mask[2])) gb = cpu::shrink(g2, lora_b.t(), scaling);
  if (output_mask[0] && !dx.has_value()) {
    at::Tensor d = at::mm(g2, weight);
    cpu::expand_add_(d, gb, lora_a, std::nullopt);  // += gB·A
    dx = d.view(x.sizes());
  }
  if (output_mask[1]) dw = at::mm(g2.t(), x2);
  if (output_mask[2]) da = at::mm(gb.to(dtype).t(), x2);
  if (output_mask[3]) db = at::mm(g2.t(), cpu::shrink(x2, lora_a, scaling).to(dtype));
  return {dx, dw, da, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace lowrank
