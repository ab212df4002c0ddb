// Where a kernel gets the float32 scale of block b of weight row n: plain absmax, or
// double-quantized scales decoded on the fly (nf4_math.h). Shared by the CPU and CUDA code;
// kernels are templated over the scale source, so both forms run the same loops.
#pragma once

#include <cstdint>

#include "nf4_math.h"

namespace jax_nf4 {

// A read of data that stays constant for the whole kernel (the read-only cache on the GPU).
template <typename T>
NF4_HD T LoadConstant(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// absmax float32 [G, N, B].
struct PlainScales {
  const float* absmax;

  struct Row {
    const float* absmax;
    // Fetch (the per-block read) and Decode are apart so a kernel can issue the reads early.
    using Raw = float;
    NF4_HD Raw Fetch(int64_t b) const { return LoadConstant(absmax + b); }
    NF4_HD float Decode(Raw raw, int64_t) const { return raw; }
    NF4_HD float operator()(int64_t b) const { return Decode(Fetch(b), b); }
  };
  NF4_HD Row RowOf(int64_t g, int64_t n, int64_t rows, int64_t blocks) const {
    return {absmax + (g * rows + n) * blocks};
  }
};

// codes uint8 [G, N, B], nested_absmax float32 [G, nested_len], table float32 [G, 256],
// offset float32 [G].
struct DoubleQuantScales {
  const uint8_t* codes;
  const float* nested_absmax;
  const float* table;
  const float* offset;
  int64_t nested_len;

  struct Row {
    const uint8_t* codes;
    const float* nested;  // nested_absmax of the 256-block group holding the row's block 0
    const float* table;
    float offset;
    int first;  // the row's block 0 within that group, 0 .. 255
    using Raw = int;  // the block's 8-bit code
    NF4_HD Raw Fetch(int64_t b) const { return LoadConstant(codes + b); }
    // The nested scale (one per 256 blocks, cache-resident) is read here. b's type sets the
    // width of the index arithmetic (kernels pass int: K / 64 < 2^31 there).
    template <typename I>
    NF4_HD float DecodeWith(float table_value, I b) const {
      return DecodeDoubleQuantScale(table_value, LoadConstant(nested + ((I(first) + b) >> 8)),
                                    offset);
    }
    template <typename I>
    NF4_HD float Decode(Raw code, I b) const {
      return DecodeWith(LoadConstant(table + code), b);
    }
    NF4_HD float operator()(int64_t b) const { return Decode(Fetch(b), b); }
  };
  NF4_HD Row RowOf(int64_t g, int64_t n, int64_t rows, int64_t blocks) const {
    static_assert(kNestedBlockSize == 256, "Row uses >> 8");
    const int64_t first_block = n * blocks;  // flat index of (n, 0)
    return {codes + (g * rows + n) * blocks, nested_absmax + g * nested_len + (first_block >> 8),
            table + g * 256, LoadConstant(offset + g), int(first_block & 255)};
  }
};

}  // namespace jax_nf4
