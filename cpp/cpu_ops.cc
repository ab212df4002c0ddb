// CPU FFI handlers for the NF4 ops, exported to Python by nanobind as `jax_nf4._nf4_cpu`.
// Loops that follow nf4_math.h exactly, for machines without a GPU; on x86-64 (glibc) the hot
// ones also come in AVX2 versions, picked at run time, that do the same float32 operations.
// Rows are spread over XLA's intra-op thread pool; every output element is computed by one
// thread in one fixed order, so results do not depend on the number of threads.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "host_cpu.h"
#include "host_dtypes.h"
#include "nanobind/nanobind.h"
#include "nf4_ffi_shapes.h"
#include "nf4_math.h"
#include "nf4_scales.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

// The fused decode-attention step (attention_cpu.cc).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxNf4DecodeAttentionCpu);

namespace jax_nf4 {
namespace {

// CodeValue as a table, for the host loops.
struct Codebook {
  float value[16];
  constexpr Codebook() : value{} {
    for (int i = 0; i < 16; ++i) value[i] = CodeValue(i);
  }
};
constexpr Codebook kCodebook;

// Float32 dot product of a[0..n) and b[0..n) in a fixed order: 16 interleaved partial sums
// (lane i takes the elements k = i mod 16, which compilers turn into SIMD adds), then the
// partial sums pairwise, then the tail. The same order on every call and thread count.
JAX_NF4_MULTIVERSION float Dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  float lane[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t k = 0; k < body; k += kLanes)
    for (int i = 0; i < kLanes; ++i) lane[i] += a[k + i] * b[k + i];
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lane[i] += lane[i + width];
  float sum = lane[0];
  for (int64_t k = body; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

// out[k] = CodeValue(code of bytes[k]) * scale for k in [0, n): the even row's codes (the low
// nibbles, EvenRowCode) or the odd row's (OddRowCode).
void DecodeRun(const uint8_t* bytes, bool odd_row, float scale, int64_t n, float* out) {
  for (int64_t k = 0; k < n; ++k)
    out[k] = kCodebook.value[odd_row ? OddRowCode(bytes[k]) : EvenRowCode(bytes[k])] * scale;
}

#if JAX_NF4_AVX2
// The AVX2 NF4 decode, eight codes at a time: the two halves of the codebook in two registers,
// each code's value picked by a lane permute from both and a blend on the code's bit 3.
struct Avx2Decoder {
  __m256 low_half, high_half;
  __m128i shift;  // 0 for the even row's codes (low nibbles), 4 for the odd row's
  __m256i nibble;

  __attribute__((target("avx2"))) explicit Avx2Decoder(bool odd_row)
      : low_half(_mm256_loadu_ps(kCodebook.value)),
        high_half(_mm256_loadu_ps(kCodebook.value + 8)),
        shift(_mm_cvtsi32_si128(odd_row ? 4 : 0)),
        nibble(_mm256_set1_epi32(15)) {}

  // CodeValue of the codes of bytes[0..8), times scale (one float32 product each).
  __attribute__((target("avx2"))) __m256 operator()(const uint8_t* bytes, __m256 scale) const {
    const __m256i wide =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    const __m256i codes = _mm256_and_si256(_mm256_srl_epi32(wide, shift), nibble);
    const __m256 value = _mm256_blendv_ps(
        _mm256_permutevar8x32_ps(low_half, codes), _mm256_permutevar8x32_ps(high_half, codes),
        _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));  // bit 3 to the sign bit
    return _mm256_mul_ps(value, scale);
  }
};

// DecodeRun with AVX2.
__attribute__((target("avx2"))) void DecodeRunAvx2(const uint8_t* bytes, bool odd_row,
                                                    float scale, int64_t n, float* out) {
  const Avx2Decoder decode(odd_row);
  const __m256 scales = _mm256_set1_ps(scale);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(out + k, decode(bytes + k, scales));
  DecodeRun(bytes + k, odd_row, scale, n - k, out + k);
}

// Dot(row, x[m]) for the M activation rows x[m] = x + m * n, with the weight row decoded in
// registers, never stored: row[k] = CodeValue(code k) * scales[k / block_size]. The same
// float32 operations in the same order as DequantizeRow + Dot (block_size % 16 == 0, so Dot's
// 16 lanes never straddle a block and there is no tail): the same results.
template <int M>
__attribute__((target("avx2"))) void DecodeDotAvx2(const uint8_t* bytes, bool odd_row,
                                                   const float* scales, int64_t block_size,
                                                   const float* x, int64_t n, float* dots) {
  const Avx2Decoder decode(odd_row);
  __m256 lanes[M][2];  // Dot's lanes 0 - 7 and 8 - 15 of each row
  for (int m = 0; m < M; ++m) lanes[m][0] = lanes[m][1] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < n; k0 += block_size) {
    const __m256 scale = _mm256_set1_ps(scales[k0 / block_size]);
    for (int64_t k = k0; k < k0 + block_size; k += 16) {
      const __m256 w0 = decode(bytes + k, scale), w1 = decode(bytes + k + 8, scale);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * n + k;
        lanes[m][0] = _mm256_add_ps(lanes[m][0], _mm256_mul_ps(w0, _mm256_loadu_ps(xm)));
        lanes[m][1] = _mm256_add_ps(lanes[m][1], _mm256_mul_ps(w1, _mm256_loadu_ps(xm + 8)));
      }
    }
  }
  for (int m = 0; m < M; ++m) {  // Dot's pairwise sums: widths 8, 4, 2, 1
    const __m256 l8 = _mm256_add_ps(lanes[m][0], lanes[m][1]);
    const __m128 l4 = _mm_add_ps(_mm256_castps256_ps128(l8), _mm256_extractf128_ps(l8, 1));
    const __m128 l2 = _mm_add_ps(l4, _mm_movehl_ps(l4, l4));
    dots[m] = _mm_cvtss_f32(_mm_add_ss(l2, _mm_shuffle_ps(l2, l2, 1)));
  }
}

// DecodeDotAvx2 for m_rows = 1 .. kDecodeDotRows activation rows (their accumulators and the
// decoded values fit the 16 vector registers); more rows go in groups of kDecodeDotRows.
constexpr int kDecodeDotRows = 4;
void DispatchDecodeDot(int64_t m_rows, const uint8_t* bytes, bool odd_row, const float* scales,
                       int64_t block_size, const float* x, int64_t n, float* dots) {
  switch (m_rows) {
    case 1: return DecodeDotAvx2<1>(bytes, odd_row, scales, block_size, x, n, dots);
    case 2: return DecodeDotAvx2<2>(bytes, odd_row, scales, block_size, x, n, dots);
    case 3: return DecodeDotAvx2<3>(bytes, odd_row, scales, block_size, x, n, dots);
    default: return DecodeDotAvx2<4>(bytes, odd_row, scales, block_size, x, n, dots);
  }
}

// (A dynamic initializer may run before libgcc's CPU detection: run it first.)
const bool kHasAvx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
#endif

// out[k] = row[k] rounded to T, k < n (vectorized where T's conversion allows).
template <typename T>
JAX_NF4_MULTIVERSION void StoreRowLoop(const float* row, int64_t n, T* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = FromFloat<T>(row[k]);
}

#if JAX_NF4_AVX2
// StoreRowLoop to float16 by the F16C conversion (round to nearest even, subnormals, overflow
// to infinity and quiet NaNs with their top payload bits, as Float16::FromFloat).
__attribute__((target("avx2,f16c"))) void StoreRowF16c(const float* row, int64_t n,
                                                       Float16* out) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(row + k), _MM_FROUND_TO_NEAREST_INT));
  StoreRowLoop(row + k, n - k, out + k);
}

const bool kHasF16c = kHasAvx2 && __builtin_cpu_supports("f16c");
#endif

// out[k] = row[k] rounded to T, k < n.
template <typename T>
void StoreRow(const float* row, int64_t n, T* out) {
#if JAX_NF4_AVX2
  if constexpr (std::is_same_v<T, Float16>) {
    if (kHasF16c) return StoreRowF16c(row, n, out);
  }
#endif
  StoreRowLoop(row, n, out);
}

// Dequantizes one row into float32: row[k] = CodeValue(code(n, k)) * scale(n, k / bs).
template <typename ScaleRow>
void DequantizeRow(const uint8_t* packed_row, int nibble, const ScaleRow& scale_of,
                   const Nf4Dims& d, float* row) {
  auto decode = &DecodeRun;
#if JAX_NF4_AVX2
  if (kHasAvx2) decode = &DecodeRunAvx2;
#endif
  for (int64_t b = 0; b < d.blocks(); ++b) {
    const int64_t k0 = b * d.block_size;
    decode(packed_row + k0, nibble != 0, scale_of(b), d.block_size, row + k0);
  }
}

// row[k] as float32, k < n.
template <typename T>
JAX_NF4_MULTIVERSION void LoadRow(const T* row, int64_t n, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = ToFloat(row[k]);
}

// The block's absmax, AbsMaxUpdate over x[0..n): the largest |x| by its bit pattern (the order
// of non-negative floats), where that leaves no NaN; a block with a NaN takes AbsMaxUpdate's
// own loop, for its NaN.
JAX_NF4_MULTIVERSION float BlockAbsMax(const float* x, int64_t n) {
  uint32_t largest = 0;
  for (int64_t k = 0; k < n; ++k) largest = std::max(largest, FloatBits(x[k]) & 0x7fffffffu);
  if (largest <= 0x7f800000u) return BitsFloat(largest);
  float amax = 0.0f;
  for (int64_t k = 0; k < n; ++k) amax = AbsMaxUpdate(amax, x[k]);
  return amax;
}

// codes[k] = QuantizeElement(x[k], absmax, InverseScale(absmax)), k < n.
JAX_NF4_MULTIVERSION void QuantizeRun(const float* x, int64_t n, float absmax, uint8_t* codes) {
  const float inv = InverseScale(absmax);
  for (int64_t k = 0; k < n; ++k) codes[k] = QuantizeElement(x[k], absmax, inv);
}

// packed[k] = PackPair(even[k], odd[k]), k < n.
JAX_NF4_MULTIVERSION void PackRow(const uint8_t* even, const uint8_t* odd, int64_t n,
                                  uint8_t* packed) {
  for (int64_t k = 0; k < n; ++k) packed[k] = PackPair(even[k], odd[k]);
}

ffi::Error QuantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer w,
                        ffi::Result<ffi::AnyBuffer> packed, ffi::Result<ffi::AnyBuffer> absmax,
                        int64_t block_size) {
  Nf4Dims d;
  if (auto e = CheckQuantizeInput(w, block_size, &d); e.failure()) return e;
  if (auto e = CheckPacked("nf4_quantize", *packed, block_size, &d); e.failure()) return e;
  if (auto e = CheckAbsmax("nf4_quantize", *absmax, d); e.failure()) return e;
  if (d.groups * d.rows * d.cols == 0) return ffi::Error::Success();
  auto* out_packed = static_cast<uint8_t*>(packed->untyped_data());
  auto* out_absmax = static_cast<float*>(absmax->untyped_data());
  return DispatchActivation(w.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = static_cast<const T*>(w.untyped_data());
    // Row pairs (g * N/2 + pair) in parallel: each writes its packed row and its two absmax rows.
    ParallelFor(pool, d.groups * (d.rows / 2), 2 * d.cols, [&](int64_t begin, int64_t end) {
      std::vector<float> values(static_cast<size_t>(d.cols));
      std::vector<uint8_t> codes(static_cast<size_t>(2 * d.cols));
      for (int64_t rp = begin; rp < end; ++rp) {
        for (int64_t h = 0; h < 2; ++h) {
          LoadRow(src + (2 * rp + h) * d.cols, d.cols, values.data());  // row g * N + 2 pair + h
          float* amax_row = out_absmax + (2 * rp + h) * d.blocks();
          for (int64_t b = 0; b < d.blocks(); ++b) {
            const int64_t k0 = b * d.block_size;
            amax_row[b] = BlockAbsMax(values.data() + k0, d.block_size);
            QuantizeRun(values.data() + k0, d.block_size, amax_row[b],
                        codes.data() + h * d.cols + k0);
          }
        }
        PackRow(codes.data(), codes.data() + d.cols, d.cols, out_packed + rp * d.cols);
      }
    });
  });
}

template <typename Scales>
ffi::Error Dequantize(ffi::ThreadPool& pool, ffi::AnyBuffer packed, const Scales& scales,
                      const Nf4Dims& d, ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = CheckDense("nf4_dequantize", "output", *out, d); e.failure()) return e;
  if (d.groups * d.rows * d.cols == 0) return ffi::Error::Success();
  const auto* src = static_cast<const uint8_t*>(packed.untyped_data());
  return DispatchActivation(out->element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = static_cast<T*>(out->untyped_data());
    ParallelFor(pool, d.groups * d.rows, d.cols, [&](int64_t begin, int64_t end) {
      std::vector<float> row(static_cast<size_t>(d.cols));
      for (int64_t gn = begin; gn < end; ++gn) {  // gn = g * N + n
        const int64_t g = gn / d.rows, n = gn % d.rows;
        DequantizeRow(src + (g * (d.rows / 2) + n / 2) * d.cols, static_cast<int>(n % 2),
                      scales.RowOf(g, n, d.rows, d.blocks()), d, row.data());
        StoreRow(row.data(), d.cols, dst + gn * d.cols);
      }
    });
  });
}

template <typename Scales>
ffi::Error Matmul(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer packed,
                  const Scales& scales, const Nf4Dims& d, ffi::Result<ffi::AnyBuffer> out) {
  int64_t m_rows = 0;
  if (auto e = CheckMatmul(x, *out, d, &m_rows); e.failure()) return e;
  if (d.groups * m_rows * d.rows == 0) return ffi::Error::Success();
  const auto* src = static_cast<const uint8_t*>(packed.untyped_data());
  return DispatchActivation(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xs = static_cast<const T*>(x.untyped_data());
    T* ys = static_cast<T*>(out->untyped_data());
#if JAX_NF4_AVX2
    const bool decode_dot = kHasAvx2 && d.block_size % 16 == 0;  // the row decoded in registers
#endif
    std::vector<float> xf(static_cast<size_t>(m_rows * d.cols));
    for (int64_t g = 0; g < d.groups; ++g) {
      const T* xg = xs + g * m_rows * d.cols;
      for (int64_t i = 0; i < m_rows * d.cols; ++i) xf[i] = ToFloat(xg[i]);
      // Weight rows in parallel; each output element is one float32 dot product (Dot's order).
      ParallelFor(pool, d.rows, (m_rows + 1) * d.cols, [&](int64_t begin, int64_t end) {
        std::vector<float> row(static_cast<size_t>(d.cols));  // the row, or its block scales
        for (int64_t n = begin; n < end; ++n) {
          const uint8_t* packed_row = src + (g * (d.rows / 2) + n / 2) * d.cols;
          const auto scale_of = scales.RowOf(g, n, d.rows, d.blocks());
          T* y = ys + g * m_rows * d.rows + n;  // y[m * d.rows]
#if JAX_NF4_AVX2
          if (decode_dot) {
            for (int64_t b = 0; b < d.blocks(); ++b) row[b] = scale_of(b);
            for (int64_t m0 = 0; m0 < m_rows; m0 += kDecodeDotRows) {
              const int64_t rows = std::min<int64_t>(kDecodeDotRows, m_rows - m0);
              float dots[kDecodeDotRows];
              DispatchDecodeDot(rows, packed_row, n % 2 != 0, row.data(), d.block_size,
                                xf.data() + m0 * d.cols, d.cols, dots);
              for (int64_t m = 0; m < rows; ++m) y[(m0 + m) * d.rows] = FromFloat<T>(dots[m]);
            }
            continue;
          }
#endif
          DequantizeRow(packed_row, static_cast<int>(n % 2), scale_of, d, row.data());
          for (int64_t m = 0; m < m_rows; ++m)
            y[m * d.rows] = FromFloat<T>(Dot(row.data(), xf.data() + m * d.cols, d.cols));
        }
      });
    }
  });
}

ffi::Error DequantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::AnyBuffer absmax,
                          ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  return WithWeight("nf4_dequantize", packed, block_size, absmax,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Dequantize(pool, packed, scales, d, out);
                    });
}

ffi::Error DequantizeDqImpl(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::AnyBuffer codes,
                            ffi::AnyBuffer nested, ffi::AnyBuffer table, ffi::AnyBuffer offset,
                            ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  return WithWeight("nf4_dequantize", packed, block_size, codes, nested, table, offset,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Dequantize(pool, packed, scales, d, out);
                    });
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer packed,
                      ffi::AnyBuffer absmax, ffi::Result<ffi::AnyBuffer> out,
                      int64_t block_size) {
  return WithWeight("nf4_matmul", packed, block_size, absmax,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Matmul(pool, x, packed, scales, d, out);
                    });
}

ffi::Error MatmulDqImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer packed,
                        ffi::AnyBuffer codes, ffi::AnyBuffer nested, ffi::AnyBuffer table,
                        ffi::AnyBuffer offset, ffi::Result<ffi::AnyBuffer> out,
                        int64_t block_size) {
  return WithWeight("nf4_matmul", packed, block_size, codes, nested, table, offset,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Matmul(pool, x, packed, scales, d, out);
                    });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kNf4QuantizeCpu, QuantizeImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // w
                           .Ret<ffi::AnyBuffer>()  // packed
                           .Ret<ffi::AnyBuffer>()  // absmax
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4DequantizeCpu, DequantizeImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax
                           .Ret<ffi::AnyBuffer>()  // w
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4DequantizeDqCpu, DequantizeDqImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax codes
                           .Arg<ffi::AnyBuffer>()  // nested_absmax
                           .Arg<ffi::AnyBuffer>()  // table
                           .Arg<ffi::AnyBuffer>()  // offset
                           .Ret<ffi::AnyBuffer>()  // w
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4MatmulCpu, MatmulImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // x
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax
                           .Ret<ffi::AnyBuffer>()  // out
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4MatmulDqCpu, MatmulDqImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // x
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax codes
                           .Arg<ffi::AnyBuffer>()  // nested_absmax
                           .Arg<ffi::AnyBuffer>()  // table
                           .Arg<ffi::AnyBuffer>()  // offset
                           .Ret<ffi::AnyBuffer>()  // out
                           .Attr<int64_t>("block_size"));

}  // namespace jax_nf4

NB_MODULE(_nf4_cpu, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["nf4_quantize"] = nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4QuantizeCpu));
    targets["nf4_dequantize"] = nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4DequantizeCpu));
    targets["nf4_matmul"] = nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4MatmulCpu));
    targets["nf4_dequantize_dq"] =
        nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4DequantizeDqCpu));
    targets["nf4_matmul_dq"] = nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4MatmulDqCpu));
    targets["decode_attention"] = nb::capsule(reinterpret_cast<void*>(JaxNf4DecodeAttentionCpu));
    return targets;
  });
}
