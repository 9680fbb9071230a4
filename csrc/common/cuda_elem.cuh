// Element traits shared by the CUDA kernels: load an element into its accumulation type, round a result back.
// float/half/bfloat16 accumulate in float, double in double. Conversions are explicit so the kernels also compile
// under torch's -D__CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lowrank {
namespace kernels {

template <typename scalar_t>
struct Elem;

template <>
struct Elem<float> {
  using acc_t = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Elem<double> {
  using acc_t = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct Elem<__half> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename scalar_t>
using elem_acc_t = typename Elem<scalar_t>::acc_t;

}  // namespace kernels
}  // namespace lowrank
