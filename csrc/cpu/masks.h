// Lane masks of the AVX-512 kernels: the first n of 16 fp32 lanes (0 for n ≤ 0, all for n ≥ 16), or of 32 16-bit
// lanes. Plain integer code, so callable from any target.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>

namespace lowrank::cpu {

inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

// The first n of 32 16-bit lanes (0 for n ≤ 0, all for n ≥ 32).
inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? ~(__mmask32)0 : n <= 0 ? (__mmask32)0 : (__mmask32)((1u << n) - 1u);
}

}  // namespace lowrank::cpu
#endif
