// Query-row attention mass, CPU.
//   mass[b, h, j] = Σ_i softmax_j(scale · q[b,h,i] · k[b, h/g, j])  over j ≤ offset + i (causal), float32
//   q [B, Hq, nq, d], k [B, Hkv, n, d], g = Hq / Hkv (grouped-query attention)
// An attention-based reranker (ICR) needs how much attention the query tokens pay to each document span, i.e.
// the column sums of nq rows of each head's attention matrix. `output_attentions=True` forms all n² entries per
// head and layer (and forces eager attention); here only the nq query rows exist. Per (batch, query head) task:
//   S = (scale·q_h) · k_hᵀ       [nq, n]  one GEMM (a scalar dot per key was 1.5–2.4× slower than ATen's
//                                          rows-only math: it read each key row once per query row)
//   S[i, j] = -inf for j > offset + i     only the upper-right triangle of the last nq columns is touched
//   P = softmax_j(S) in place             ATen's vectorized softmax (exp in SIMD)
//   mass_h = Σ_i P[i, :]                  written straight into the output row
// Everything is fp32 (fp64 for double input), as eager attention's softmax is. The tasks run in parallel; ATen
// calls inside a parallel region run single-threaded, so there is no oversubscription. Unlike the plain-PyTorch
// reference, a key head shared by g query heads (GQA) is never copied g times: each task converts (for bf16 /
// fp16) or views its key head directly. Working memory per thread: nq·n + n·d scalars.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <limits>

#include "common/scoring_checks.h"

namespace lowrank {
namespace {

void query_attention_mass_kernel(const at::Tensor& q, const at::Tensor& k, double scale, int64_t offset,
                                 at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), nq = q.size(2), Hkv = k.size(1), n = k.size(2);
  const int64_t group = Hq / Hkv;
  const auto acc = out.scalar_type();
  const double neg_inf = -std::numeric_limits<double>::infinity();
  // The tasks call ATen ops: OpenMP workers must see the caller's thread-local state (InferenceMode above all:
  // writing into `out`, an inference tensor when the caller is in inference mode, is refused outside it).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard tls_guard(caller_state);
    at::Tensor scores = at::empty({nq, n}, out.options());
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      const at::Tensor qh = q.select(0, b).select(0, h).to(acc) * scale;      // fresh [nq, d]: q stays as is
      const at::Tensor kh = k.select(0, b).select(0, h / group).to(acc);      // [n, d], a view when fp32
      at::mm_out(scores, qh, kh.t());
      // Row i sees keys 0 .. offset+i; with offset + nq == n (the usual case) that masks a triangle.
      AT_DISPATCH_FLOATING_TYPES(acc, "query_attention_mass_mask", [&] {
        scalar_t* sp = scores.mutable_data_ptr<scalar_t>();
        for (int64_t i = 0; i < nq; ++i)
          for (int64_t j = offset + i + 1; j < n; ++j) sp[i * n + j] = static_cast<scalar_t>(neg_inf);
      });
      at::_softmax_out(scores, scores, /*dim=*/1, /*half_to_float=*/false);
      at::Tensor mass = out.select(0, b).select(0, h);
      at::sum_out(mass, scores, /*dim=*/{0});
    }
  });
}

at::Tensor query_attention_mass_cpu(const at::Tensor& q, const at::Tensor& k, double scale, int64_t offset) {
  check_query_attention_mass_args(q, k, scale, offset);
  const int64_t B = q.size(0), Hq = q.size(1), nq = q.size(2), n = k.size(2);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({B, Hq, n}, q.options().dtype(acc));
  if (out.numel() == 0 || nq == 0) return out;
  query_attention_mass_kernel(q, k, scale, offset, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("query_attention_mass", &query_attention_mass_cpu); }

}  // namespace lowrank
