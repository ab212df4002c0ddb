// The NF4 format, once: codebook, nibble order, scale decode and the quantizer's rounding.
// Used by the CPU handlers and the CUDA kernels alike (see ../shared/NF4_FORMAT.md).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NF4_HD __host__ __device__ __forceinline__
#else
#define NF4_HD inline
#endif

namespace jax_nf4 {

// The 16 NF4 code values (QLoRA's NormalFloat quantiles), exactly bitsandbytes' float32 table.
// Dequantization of element (n, k) is CodeValue(code) * absmax[n, k / block_size], one float32
// product, rounded once to the output dtype.
NF4_HD constexpr float CodeValue(int code) {
  switch (code & 15) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// The code every element of an all-zero block gets (its absmax is 0).
constexpr uint8_t kZeroCode = 7;

// Midpoint between codes i and i+1, in float32. Equal to bitsandbytes' decision-tree literals
// (the exact sum of two float32 values rounded once, then halved exactly).
NF4_HD constexpr float Midpoint(int i) { return (CodeValue(i) + CodeValue(i + 1)) * 0.5f; }

// Nearest code to a normalized value xn = x * (1 / absmax); a tie goes to the lower code
// (strict '>' against each midpoint, as bitsandbytes does). NaN maps to code 0.
NF4_HD uint8_t QuantizeNormalized(float xn) {
  // Count the midpoints below xn: 15 compares against constants, branch-free on CPU and GPU.
  int code = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) code += (xn > Midpoint(i)) ? 1 : 0;
  return static_cast<uint8_t>(code);
}

// Running absmax of a block: max of |v|, NaN-propagating like NumPy's max (a NaN anywhere in
// the block gives a NaN absmax, whose codes are then all 0).
NF4_HD float AbsMaxUpdate(float running, float v) {
  const float a = v < 0.0f ? -v : v;
  return (a > running || a != a) ? a : running;
}

// The scale the quantizer multiplies by: float32 reciprocal of the block's absmax.
NF4_HD float InverseScale(float absmax) { return 1.0f / absmax; }

// Code of element x in a block with the given absmax and inverse scale.
NF4_HD uint8_t QuantizeElement(float x, float absmax, float inv_absmax) {
  return absmax == 0.0f ? kZeroCode : QuantizeNormalized(x * inv_absmax);
}

// Double-quantized block scales (bitsandbytes' compress_statistics): block i of a matrix (flat
// row-major block order, i = n * (K / block_size) + b) has
//   absmax[i] = table[codes[i]] * nested_absmax[i / 256] + offset,
// a float32 product and a float32 sum, each rounded once (never fused into an FMA).
constexpr int kNestedBlockSize = 256;

NF4_HD float DecodeDoubleQuantScale(float table_value, float nested_absmax, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(table_value, nested_absmax), offset);
#else
  const float product = table_value * nested_absmax;  // the CPU module builds with
  return product + offset;                            // -ffp-contract=off: no FMA here
#endif
}

// Layout A packs rows 2j (low nibble) and 2j+1 (high nibble) of column k into byte (j, k).
NF4_HD uint8_t PackPair(uint8_t even_row_code, uint8_t odd_row_code) {
  return static_cast<uint8_t>((even_row_code & 15) | (odd_row_code << 4));
}
NF4_HD int EvenRowCode(uint32_t byte) { return static_cast<int>(byte & 15u); }
NF4_HD int OddRowCode(uint32_t byte) { return static_cast<int>((byte >> 4) & 15u); }

}  // namespace jax_nf4
