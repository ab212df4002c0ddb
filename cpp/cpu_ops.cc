// CPU FFI handlers for the NF4 ops, exported to Python by nanobind as `jax_nf4._nf4_cpu`.
// Reference-quality loops: they follow nf4_math.h exactly and serve machines without a GPU.
#include <cstdint>
#include <vector>

#include "host_dtypes.h"
#include "nanobind/nanobind.h"
#include "nf4_ffi_shapes.h"
#include "nf4_math.h"
#include "nf4_scales.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

namespace jax_nf4 {
namespace {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the storage type of an activation dtype.
template <typename Fn>
ffi::Error DispatchActivation(ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F32: fn(TypeTag<float>{}); return ffi::Error::Success();
    case ffi::DataType::BF16: fn(TypeTag<BFloat16>{}); return ffi::Error::Success();
    case ffi::DataType::F16: fn(TypeTag<Float16>{}); return ffi::Error::Success();
    default: return ffi::Error::InvalidArgument("unsupported activation dtype");
  }
}

// CodeValue as a table, for the host loops.
struct Codebook {
  float value[16];
  constexpr Codebook() : value{} {
    for (int i = 0; i < 16; ++i) value[i] = CodeValue(i);
  }
};
constexpr Codebook kCodebook;

// Dequantizes one row into float32: row[k] = CodeValue(code(n, k)) * scale(n, k / bs).
template <typename ScaleRow>
void DequantizeRow(const uint8_t* packed_row, int nibble, const ScaleRow& scale_of,
                   const Nf4Dims& d, float* row) {
  for (int64_t b = 0; b < d.blocks(); ++b) {
    const float scale = scale_of(b);
    for (int64_t k = b * d.block_size; k < (b + 1) * d.block_size; ++k) {
      const uint32_t byte = packed_row[k];
      row[k] = kCodebook.value[nibble ? OddRowCode(byte) : EvenRowCode(byte)] * scale;
    }
  }
}

ffi::Error QuantizeImpl(ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> packed,
                        ffi::Result<ffi::AnyBuffer> absmax, int64_t block_size) {
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
    std::vector<uint8_t> codes(static_cast<size_t>(d.cols));
    for (int64_t g = 0; g < d.groups; ++g) {
      for (int64_t n = 0; n < d.rows; ++n) {
        const T* row = src + (g * d.rows + n) * d.cols;
        float* amax_row = out_absmax + (g * d.rows + n) * d.blocks();
        for (int64_t b = 0; b < d.blocks(); ++b) {
          const int64_t k0 = b * d.block_size;
          float amax = 0.0f;
          for (int64_t k = k0; k < k0 + d.block_size; ++k) amax = AbsMaxUpdate(amax, ToFloat(row[k]));
          amax_row[b] = amax;
          const float inv = InverseScale(amax);
          for (int64_t k = k0; k < k0 + d.block_size; ++k)
            codes[k] = QuantizeElement(ToFloat(row[k]), amax, inv);
        }
        uint8_t* prow = out_packed + (g * (d.rows / 2) + n / 2) * d.cols;
        for (int64_t k = 0; k < d.cols; ++k)
          prow[k] = (n % 2 == 0) ? codes[k] : PackPair(prow[k], codes[k]);
      }
    }
  });
}

template <typename Scales>
ffi::Error Dequantize(ffi::AnyBuffer packed, const Scales& scales, const Nf4Dims& d,
                      ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = CheckDense("nf4_dequantize", "output", *out, d); e.failure()) return e;
  if (d.groups * d.rows * d.cols == 0) return ffi::Error::Success();
  const auto* src = static_cast<const uint8_t*>(packed.untyped_data());
  return DispatchActivation(out->element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = static_cast<T*>(out->untyped_data());
    std::vector<float> row(static_cast<size_t>(d.cols));
    for (int64_t g = 0; g < d.groups; ++g) {
      for (int64_t n = 0; n < d.rows; ++n) {
        DequantizeRow(src + (g * (d.rows / 2) + n / 2) * d.cols, static_cast<int>(n % 2),
                      scales.RowOf(g, n, d.rows, d.blocks()), d, row.data());
        T* drow = dst + (g * d.rows + n) * d.cols;
        for (int64_t k = 0; k < d.cols; ++k) drow[k] = FromFloat<T>(row[k]);
      }
    }
  });
}

template <typename Scales>
ffi::Error Matmul(ffi::AnyBuffer x, ffi::AnyBuffer packed, const Scales& scales,
                  const Nf4Dims& d, ffi::Result<ffi::AnyBuffer> out) {
  int64_t m_rows = 0;
  if (auto e = CheckMatmul(x, *out, d, &m_rows); e.failure()) return e;
  if (d.groups * m_rows * d.rows == 0) return ffi::Error::Success();
  const auto* src = static_cast<const uint8_t*>(packed.untyped_data());
  return DispatchActivation(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xs = static_cast<const T*>(x.untyped_data());
    T* ys = static_cast<T*>(out->untyped_data());
    std::vector<float> xf(static_cast<size_t>(m_rows * d.cols));
    std::vector<float> row(static_cast<size_t>(d.cols));
    for (int64_t g = 0; g < d.groups; ++g) {
      const T* xg = xs + g * m_rows * d.cols;
      for (int64_t i = 0; i < m_rows * d.cols; ++i) xf[i] = ToFloat(xg[i]);
      for (int64_t n = 0; n < d.rows; ++n) {
        DequantizeRow(src + (g * (d.rows / 2) + n / 2) * d.cols, static_cast<int>(n % 2),
                      scales.RowOf(g, n, d.rows, d.blocks()), d, row.data());
        for (int64_t m = 0; m < m_rows; ++m) {
          const float* xm = xf.data() + m * d.cols;
          float acc = 0.0f;
          for (int64_t k = 0; k < d.cols; ++k) acc += row[k] * xm[k];
          ys[(g * m_rows + m) * d.rows + n] = FromFloat<T>(acc);
        }
      }
    }
  });
}

ffi::Error DequantizeImpl(ffi::AnyBuffer packed, ffi::AnyBuffer absmax,
                          ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  Nf4Dims d;
  PlainScales scales;
  if (auto e = CheckWeight("nf4_dequantize", packed, block_size, absmax, &d, &scales); e.failure())
    return e;
  return Dequantize(packed, scales, d, out);
}

ffi::Error DequantizeDqImpl(ffi::AnyBuffer packed, ffi::AnyBuffer codes, ffi::AnyBuffer nested,
                            ffi::AnyBuffer table, ffi::AnyBuffer offset,
                            ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  Nf4Dims d;
  DoubleQuantScales scales;
  if (auto e = CheckWeight("nf4_dequantize", packed, block_size, codes, nested, table, offset, &d,
                           &scales);
      e.failure())
    return e;
  return Dequantize(packed, scales, d, out);
}

ffi::Error MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer packed, ffi::AnyBuffer absmax,
                      ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  Nf4Dims d;
  PlainScales scales;
  if (auto e = CheckWeight("nf4_matmul", packed, block_size, absmax, &d, &scales); e.failure())
    return e;
  return Matmul(x, packed, scales, d, out);
}

ffi::Error MatmulDqImpl(ffi::AnyBuffer x, ffi::AnyBuffer packed, ffi::AnyBuffer codes,
                        ffi::AnyBuffer nested, ffi::AnyBuffer table, ffi::AnyBuffer offset,
                        ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  Nf4Dims d;
  DoubleQuantScales scales;
  if (auto e = CheckWeight("nf4_matmul", packed, block_size, codes, nested, table, offset, &d,
                           &scales);
      e.failure())
    return e;
  return Matmul(x, packed, scales, d, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kNf4QuantizeCpu, QuantizeImpl,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()  // w
                           .Ret<ffi::AnyBuffer>()  // packed
                           .Ret<ffi::AnyBuffer>()  // absmax
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4DequantizeCpu, DequantizeImpl,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax
                           .Ret<ffi::AnyBuffer>()  // w
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4DequantizeDqCpu, DequantizeDqImpl,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax codes
                           .Arg<ffi::AnyBuffer>()  // nested_absmax
                           .Arg<ffi::AnyBuffer>()  // table
                           .Arg<ffi::AnyBuffer>()  // offset
                           .Ret<ffi::AnyBuffer>()  // w
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4MatmulCpu, MatmulImpl,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()  // x
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax
                           .Ret<ffi::AnyBuffer>()  // out
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4MatmulDqCpu, MatmulDqImpl,
                       ffi::Ffi::Bind()
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
    return targets;
  });
}
