// Identifier-logit gather, CPU.
//   logits[t, j] = hidden[t] · weight[ids[j]] + bias[ids[j]]      hidden [T, d], weight [V, d], ids [k], bias [V]
// A listwise reranker (FIRST) needs the next-token logits of a handful of identifier tokens at one position, not
// the V-wide vocabulary projection (V = 49152 for SmolLM2, so k = 20 identifiers is 0.04% of the work and of the
// LM-head bytes read). Each output is one dot product of length d, accumulated in fp32 (fp64 for double) and
// rounded once. Work is split over (token, identifier) pairs; for each pair the two rows are contiguous in d.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/scoring_checks.h"

namespace lowrank {
namespace {

template <typename scalar_t, typename acc_t>
void gather_logits_kernel(const scalar_t* h, int64_t ldh, const scalar_t* w, int64_t ldw, const int64_t* ids,
                          const scalar_t* bias, scalar_t* out, int64_t T, int64_t k, int64_t d) {
  // Identifier-major inside a token block: one W row is reused across the block's tokens while it is in L1.
  constexpr int64_t kTokBlock = 16;
  const int64_t n_tblocks = (T + kTokBlock - 1) / kTokBlock;
  at::parallel_for(0, n_tblocks * k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tb = task / k, j = task % k;
      const scalar_t* wrow = w + ids[j] * ldw;
      const acc_t b = bias ? static_cast<acc_t>(bias[ids[j]]) : acc_t(0);
      const int64_t t_end = std::min(T, (tb + 1) * kTokBlock);
      for (int64_t t = tb * kTokBlock; t < t_end; ++t) {
        const scalar_t* hrow = h + t * ldh;
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; ++c) acc += static_cast<acc_t>(hrow[c]) * static_cast<acc_t>(wrow[c]);
        out[t * k + j] = static_cast<scalar_t>(acc + b);
      }
    }
  });
}

at::Tensor gather_logits_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& ids,
                             const std::optional<at::Tensor>& bias) {
  check_gather_logits_args(hidden, weight, ids, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t T = hidden.size(0), d = hidden.size(1), V = weight.size(0), k = ids.size(0);
  const at::Tensor ids64 = ids.to(at::kLong).contiguous();
  const int64_t* id = ids64.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK_INDEX(id[j] >= 0 && id[j] < V, "gather_logits: ids[", j, "] = ", id[j], " is outside [0, V=", V, ")");
  }
  at::Tensor out = at::empty({T, k}, hidden.options());
  if (T == 0 || k == 0) return out;
  if (d == 0) return has_bias ? bias->index_select(0, ids64).expand({T, k}).contiguous() : out.zero_();
  // Rows may be strided (a slice of a hidden-state tensor); elements within a row must be contiguous.
  const at::Tensor h = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "gather_logits_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    gather_logits_kernel<scalar_t, acc_t>(h.const_data_ptr<scalar_t>(), h.stride(0), w.const_data_ptr<scalar_t>(),
                                          w.stride(0), id, has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                          out.mutable_data_ptr<scalar_t>(), T, k, d);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("gather_logits", &gather_logits_cpu); }

}  // namespace lowrank
