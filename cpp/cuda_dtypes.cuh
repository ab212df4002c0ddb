// float32 <-> activation dtype conversions of the CUDA kernels (round to nearest even), the
// handlers' dispatch over the activation dtypes, and the 16-bit dtypes' tensor-core operations
// (mma.m16n8k16 with float32 accumulation).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {

// Calls fn(T{}) with the CUDA storage type T of an activation dtype (float32 for any other
// dtype: the handlers check dtypes first).
template <typename Fn>
cudaError_t DispatchActivation(xla::ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case xla::ffi::DataType::BF16: return fn(__nv_bfloat16{});
    case xla::ffi::DataType::F16: return fn(__half{});
    default: return fn(float{});
  }
}

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }

// The 16-bit dtypes' register pairs and tensor-core product: Pack, two float32 as one register
// of the dtype (lo in the low half), Unpack its inverse; Mul, the elementwise product of two
// packed registers; Mma, c += a b (m16n8k16, a row-major, b column-major, float32 c).
template <typename T>
struct MmaType {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
  static constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  using Pair = std::conditional_t<kBf16, __nv_bfloat162, __half2>;

  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    Pair v;
    if constexpr (kBf16) {
      v = __floats2bfloat162_rn(lo, hi);
    } else {
      v = __floats2half2_rn(lo, hi);
    }
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 Unpack(uint32_t v) {
    if constexpr (kBf16) {
      return __bfloat1622float2(*reinterpret_cast<Pair*>(&v));
    } else {
      return __half22float2(*reinterpret_cast<Pair*>(&v));
    }
  }
  static __device__ __forceinline__ uint32_t Mul(uint32_t a, uint32_t b) {
    Pair v = __hmul2(*reinterpret_cast<Pair*>(&a), *reinterpret_cast<Pair*>(&b));
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    if constexpr (kBf16) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
          "{%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
          "{%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
  }
};

}  // namespace jax_nf4
