// Per-token gate math of the mixture of rank-1 experts LoRA, torch-free (host loops and CUDA threads run the
// same code; specification: lowrank/reference/rank1_experts_lora.py). One token's row of act = [h | z] in S
// (float, or double for double inputs), p = σ(z) for the router gate (computed by the caller), router bias rb.
// Outputs go straight to the token's rows of the [T, k] / [T, E] results, which also serve as scratch, so no
// per-thread array of runtime size is needed.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LOWRANK_HD __host__ __device__ inline
#else
#define LOWRANK_HD inline
#endif

namespace lowrank {

constexpr double kRank1NormEps = 1e-12;  // floor of ‖h‖₂ under "self" gating (reference NORM_EPS)

template <typename S>
LOWRANK_HD S rank1_max(S a, S b) { return a > b ? a : b; }

// max(‖h‖₂, eps) over the E ranks.
template <typename S>
LOWRANK_HD S rank1_norm(const S* h, int64_t E) {
  S ss = 0;
  for (int64_t e = 0; e < E; ++e) ss += h[e] * h[e];
  return rank1_max(std::sqrt(ss), S(kRank1NormEps));
}

// The k best experts into idx[0..k) (val[0..k) their selection scores): descending score, ties to the lower index
// (a stable descending sort). Scores: router p_e + rb_e; self h_e / r. Scanning e upwards, a candidate enters only
// when strictly greater than the current k-th, so an equal later index never passes an earlier one.
template <typename S>
LOWRANK_HD void rank1_select(const S* h, const S* p, const S* rb, int64_t E, int64_t k, bool router, S r,
                             int64_t* idx, S* val) {
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) {
    const S v = router ? p[e] + (rb ? rb[e] : S(0)) : h[e] / r;
    if (n == k && !(v > val[k - 1])) continue;
    int64_t pos = n < k ? n++ : k - 1;
    while (pos > 0 && v > val[pos - 1]) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = e;
  }
}

// Pre-threshold gates g[0..k) of the selected experts: router g = p_sel / Σ p_sel; self g = softmax(n_sel / τ),
// n = h / r, shifted by the first (largest) selected score.
template <typename S>
LOWRANK_HD void rank1_gates(const S* h, const S* p, const int64_t* idx, int64_t k, bool router, S r,
                            double temperature, S* g) {
  S sum = 0;
  const S top = router ? S(0) : (h[idx[0]] / r) / S(temperature);
  for (int64_t j = 0; j < k; ++j) {
    g[j] = router ? p[idx[j]] : std::exp((h[idx[j]] / r) / S(temperature) - top);
    sum += g[j];
  }
  for (int64_t j = 0; j < k; ++j) g[j] /= sum;
}

// Forward epilogue of one token: idx, gates (post-threshold) and u_j = s·g_j·h_sel.
// Gates (post-threshold) and u of one token whose selection idx is made (r: rank1_norm for self, 1 for router).
template <typename S>
LOWRANK_HD void rank1_finish_token(const S* h, const S* p, const int64_t* idx, int64_t k, bool router, S r,
                                   double scaling, double temperature, bool has_threshold, double threshold, S* g,
                                   S* u) {
  rank1_gates(h, p, idx, k, router, r, temperature, g);
  for (int64_t j = 0; j < k; ++j) {
    if (has_threshold && g[j] < S(threshold)) g[j] = S(0);
    u[j] = S(scaling) * g[j] * h[idx[j]];
  }
}

template <typename S>
LOWRANK_HD void rank1_forward_token(const S* h, const S* p, const S* rb, int64_t E, int64_t k, bool router,
                                    double scaling, double temperature, bool has_threshold, double threshold,
                                    int64_t* idx, S* g, S* u) {
  const S r = router ? S(1) : rank1_norm(h, E);
  rank1_select(h, p, rb, E, k, router, r, idx, g);  // g holds the selection scores until rank1_gates
  rank1_finish_token(h, p, idx, k, router, r, scaling, temperature, has_threshold, threshold, g, u);
}

// Backward of one token. q = (G·B)_t [E], gg = grad of the returned gates [k] or null. Adds into dh [E] (and
// writes dz [E] for the router gate; both zero on entry) and writes ut [E] = u scattered (zero on entry).
// g, dg: scratch [k].
//   u_j = s·g_j·keep_j·h_ej:  dh_ej += s·g_j·keep_j·q_ej;  dg_j = keep_j·(s·h_ej·q_ej + gg_j)
//   router: g = p_sel / P   → dz_ej = (dg_j − Σ g·dg) / P · p_ej·(1 − p_ej)
//   self:   g = softmax(n_sel/τ), n = h / r → dn_ej = g_j·(dg_j − Σ g·dg) / τ;  dh += (dn − n·(n·dn)) / r
//           (r clamped at eps: dh += dn / eps)
template <typename S>
LOWRANK_HD void rank1_backward_token(const S* h, const S* p, int64_t E, const int64_t* idx, int64_t k,
                                     const S* q, const S* gg, bool router, double scaling, double temperature,
                                     bool has_threshold, double threshold, S* g, S* dg, S* dh, S* dz, S* ut) {
  const S s = S(scaling);
  const S r = router ? S(1) : rank1_norm(h, E);
  rank1_gates(h, p, idx, k, router, r, temperature, g);
  S dot = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = idx[j];
    const S keep = has_threshold && g[j] < S(threshold) ? S(0) : S(1);
    const S gpost = g[j] * keep;
    ut[e] = s * gpost * h[e];
    dh[e] += s * gpost * q[e];
    dg[j] = keep * (s * h[e] * q[e] + (gg ? gg[j] : S(0)));
    dot += g[j] * dg[j];
  }
  if (router) {
    S P = 0;
    for (int64_t j = 0; j < k; ++j) P += p[idx[j]];
    for (int64_t j = 0; j < k; ++j) {
      const S pe = p[idx[j]];
      dz[idx[j]] = (dg[j] - dot) / P * pe * (S(1) - pe);
    }
    return;
  }
  S ndn = 0;
  for (int64_t j = 0; j < k; ++j) {
    dg[j] = g[j] * (dg[j] - dot) / S(temperature);  // now dn of expert idx[j]
    ndn += (h[idx[j]] / r) * dg[j];
  }
  if (r > S(kRank1NormEps)) {
    for (int64_t e = 0; e < E; ++e) dh[e] -= (h[e] / r) * ndn / r;
  }
  for (int64_t j = 0; j < k; ++j) dh[idx[j]] += dg[j] / r;
}

}  // namespace lowrank
