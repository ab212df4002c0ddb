// Host-side float16 / bfloat16 storage types with round-to-nearest-even conversions, matching
// NumPy / ml_dtypes `astype` bit for bit (the CUDA side uses cuda_fp16.h / cuda_bf16.h), and
// the CPU handlers' dispatch over the activation dtypes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

struct BFloat16 {
  uint16_t bits;
  static BFloat16 FromFloat(float f) {
    uint32_t x = FloatBits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};
    return {static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
  }
  float ToFloat() const { return BitsFloat(static_cast<uint32_t>(bits) << 16); }
};

struct Float16 {
  uint16_t bits;
  static Float16 FromFloat(float f) {
    uint32_t x = FloatBits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // inf stays inf; NaN stays a quiet NaN with its top payload bits
      return {static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u))};
    if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
    if (ax < 0x38800000u) {  // below 2^-14: a half subnormal (or zero), units of 2^-24
      float scaled = BitsFloat(ax) * 16777216.0f;  // exact: a power-of-two scaling
      return {static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)))};
    }
    uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
    return {static_cast<uint16_t>(sign | ((rounded >> 13) - (112u << 10)))};
  }
  float ToFloat() const {
    uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    uint32_t exp = (bits >> 10) & 0x1fu;
    uint32_t mant = bits & 0x3ffu;
    if (exp == 0x1fu) return BitsFloat(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {  // zero or subnormal: mant * 2^-24
      float v = static_cast<float>(mant) * (1.0f / 16777216.0f);
      return sign ? -v : v;
    }
    return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  }
};

template <typename T>
inline float ToFloat(T v) { return v.ToFloat(); }
template <>
inline float ToFloat<float>(float v) { return v; }

template <typename T>
inline T FromFloat(float f) { return T::FromFloat(f); }
template <>
inline float FromFloat<float>(float f) { return f; }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the storage type T of an activation dtype (float32, bfloat16,
// float16).
template <typename Fn>
xla::ffi::Error DispatchActivation(xla::ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case xla::ffi::DataType::F32: fn(TypeTag<float>{}); return xla::ffi::Error::Success();
    case xla::ffi::DataType::BF16: fn(TypeTag<BFloat16>{}); return xla::ffi::Error::Success();
    case xla::ffi::DataType::F16: fn(TypeTag<Float16>{}); return xla::ffi::Error::Success();
    default: return xla::ffi::Error::InvalidArgument("unsupported activation dtype");
  }
}

}  // namespace jax_nf4
