// Query-row attention mass, CPU.
//   mass[b, h, j] = Σ_i softmax_j(scale · q[b,h,i] · k[b, h/g, j])  over j ≤ offset + i (causal), float32
//   q [B, Hq, nq, d], k [B, Hkv, n, d], g = Hq / Hkv (grouped-query attention)
// An attention-based reranker (ICR) needs how much attention the query tokens pay to each document span, i.e.
// the column sums of nq rows of each head's attention matrix. `output_attentions=True` forms all n² entries per
// head and layer (and forces eager attention); here only the nq query rows exist, one row at a time: the row's
// scores (a dot of length d per key), its max and normaliser, then p = exp(s - max) / Σ added into the head's
// column sums. Memory is O(n) per thread. Everything is computed in fp32 (fp64 for double input), as eager
// attention's softmax is. Parallel over (batch, head); for low-precision input each task converts its key head
// to fp32 once, so the nq rows' dot products read fp32 rows that stay in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/scoring_checks.h"

namespace lowrank {
namespace {

template <typename scalar_t, typename acc_t>
void query_attention_mass_kernel(const at::Tensor& q, const at::Tensor& k, acc_t scale, int64_t offset,
                                 at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), nq = q.size(2), d = q.size(3), Hkv = k.size(1), n = k.size(2);
  const int64_t group = Hq / Hkv;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  acc_t* op = out.mutable_data_ptr<acc_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(n), qrow(d), kbuf(kConvert ? n * d : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      const scalar_t* khead = kp + b * ks0 + (h / group) * ks1;
      const acc_t* krows = nullptr;
      int64_t ldk = ks2;
      if constexpr (kConvert) {
        for (int64_t j = 0; j < n; ++j)
          for (int64_t c = 0; c < d; ++c) kbuf[j * d + c] = static_cast<acc_t>(khead[j * ks2 + c]);
        krows = kbuf.data();
        ldk = d;
      } else {
        krows = khead;
      }
      acc_t* mass = op + bh * n;
      for (int64_t j = 0; j < n; ++j) mass[j] = 0;
      for (int64_t i = 0; i < nq; ++i) {
        const scalar_t* qi = qp + b * qs0 + h * qs1 + i * qs2;
        for (int64_t c = 0; c < d; ++c) qrow[c] = static_cast<acc_t>(qi[c]) * scale;
        const int64_t lim = offset + i + 1;  // keys 0 .. offset+i are visible (causal)
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < lim; ++j) {
          const acc_t* kr = krows + j * ldk;
          acc_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t c = 0; c < d; ++c) s += qrow[c] * kr[c];
          scores[j] = s;
          mx = std::max(mx, s);
        }
        acc_t sum = 0;
        for (int64_t j = 0; j < lim; ++j) {
          scores[j] = std::exp(scores[j] - mx);
          sum += scores[j];
        }
        const acc_t inv = acc_t(1) / sum;
        for (int64_t j = 0; j < lim; ++j) mass[j] += scores[j] * inv;
      }
    }
  });
}

at::Tensor query_attention_mass_cpu(const at::Tensor& q, const at::Tensor& k, double scale, int64_t offset) {
  check_query_attention_mass_args(q, k, scale, offset);
  const int64_t B = q.size(0), Hq = q.size(1), nq = q.size(2), n = k.size(2);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({B, Hq, n}, q.options().dtype(acc));
  if (out.numel() == 0 || nq == 0) return out;
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "query_attention_mass_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    query_attention_mass_kernel<scalar_t, acc_t>(qc, kc, static_cast<acc_t>(scale), offset, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("query_attention_mass", &query_attention_mass_cpu); }

}  // namespace lowrank
