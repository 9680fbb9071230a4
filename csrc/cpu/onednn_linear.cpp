// lowrank::onednn_linear, CPU: y = x·Wᵀ + b in float32 on oneDNN's fp32 GEMM (cpu::onednn_linear, ATen's
// mkldnn::_linear_pointwise with a plain dense weight, the bias in the GEMM's epilogue). No kernel of our own: the
// op exists to choose that GEMM where it is faster than the one F.linear takes (MKL's sgemm), as an opaque op that
// torch.compile keeps (Inductor lowers ATen's mkldnn linear only for frozen, constant weights). Measured on an AMD
// EPYC Zen 4, 2 threads, MiniLM/BERT shapes: 0.68–0.77× F.linear's time, max error against fp64 2–2.6× MKL's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/lowrank_kernels.h"

namespace lowrank {
namespace {

at::Tensor onednn_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  // The Python wrapper validates with messages naming the arguments; these guard direct torch.ops calls.
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                       (!bias.has_value() || bias->scalar_type() == at::kFloat),
                   "onednn_linear: x, weight and bias must be float32");
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1) &&
                        (!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0))),
                    "onednn_linear: expected x [..., in], weight [out, in], bias [out]");
  TORCH_CHECK(cpu::onednn_linear_op() != nullptr, "onednn_linear: this torch build has no mkldnn::_linear_pointwise");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, weight.size(1)});
  if (x2.size(0) == 0 || weight.size(0) == 0 || weight.size(1) == 0) return at::linear(x, weight, bias);
  return cpu::onednn_linear(x2, weight.contiguous(), bias).view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("onednn_linear", &onednn_linear_cpu); }

}  // namespace lowrank
