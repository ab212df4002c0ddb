// Shape and dtype checks shared by the CPU and CUDA FFI handlers. Every op works on a leading
// group dimension G (stacked weights / vmap), so all operands are rank 3:
//   packed  uint8 [G, N/2, K]      absmax float32 [G, N, K/block_size]
//   x       T     [G, M, K]        out    T       [G, M, N]          (matmul)
//   w       T     [G, N, K]                                          (quantize input, dequantize output)
// The Python layer checks the same things with friendlier messages at trace time; these checks
// make the handlers safe on their own.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "nf4_scales.h"
#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {

namespace ffi = xla::ffi;

struct Nf4Dims {
  int64_t groups = 0;      // G
  int64_t rows = 0;        // N (even)
  int64_t cols = 0;        // K (multiple of block_size)
  int64_t block_size = 0;  // elements of one row sharing a scale
  int64_t blocks() const { return block_size > 0 ? cols / block_size : 0; }
};

// "[d0, d1, ...]" of any range of dims (an ffi::Span, an initializer_list).
template <typename Dims>
std::string DimsToString(const Dims& dims) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : dims) {
    s += (first ? "" : ", ") + std::to_string(d);
    first = false;
  }
  return s + "]";
}

inline bool IsActivationType(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

// Checks packed [G, N/2, K] and the block size; fills dims.
inline ffi::Error CheckPacked(const char* op, ffi::AnyBuffer packed, int64_t block_size,
                              Nf4Dims* dims) {
  auto err = [op](const std::string& msg) {
    return ffi::Error::InvalidArgument(std::string(op) + ": " + msg);
  };
  if (block_size <= 0) return err("block_size must be positive, got " + std::to_string(block_size));
  if (packed.element_type() != ffi::DataType::U8) return err("packed must be uint8");
  auto pd = packed.dimensions();
  if (pd.size() != 3) return err("packed must be [G, N/2, K], got " + DimsToString(pd));
  dims->groups = pd[0];
  dims->rows = 2 * pd[1];
  dims->cols = pd[2];
  dims->block_size = block_size;
  if (dims->cols % block_size != 0)
    return err("K = " + std::to_string(dims->cols) + " is not a multiple of block_size = " +
               std::to_string(block_size));
  return ffi::Error::Success();
}

// Checks plain float32 scales absmax [G, N, K/bs] against dims.
inline ffi::Error CheckAbsmax(const char* op, ffi::AnyBuffer absmax, const Nf4Dims& d) {
  auto ad = absmax.dimensions();
  if (absmax.element_type() != ffi::DataType::F32 || ad.size() != 3 || ad[0] != d.groups ||
      ad[1] != d.rows || ad[2] != d.blocks())
    return ffi::Error::InvalidArgument(
        std::string(op) + ": absmax must be float32[" + std::to_string(d.groups) + ", " +
        std::to_string(d.rows) + ", " + std::to_string(d.blocks()) + "], got " +
        DimsToString(ad));
  return ffi::Error::Success();
}

// Checks double-quantized scales against dims (see nf4_math.h):
//   codes uint8 [G, N, K/bs], nested_absmax float32 [G, ceil(N*K/bs / 256)],
//   table float32 [G, 256], offset float32 [G].
inline ffi::Error CheckDoubleQuantScales(const char* op, ffi::AnyBuffer codes,
                                         ffi::AnyBuffer nested, ffi::AnyBuffer table,
                                         ffi::AnyBuffer offset, const Nf4Dims& d) {
  auto err = [op](const std::string& msg) {
    return ffi::Error::InvalidArgument(std::string(op) + ": " + msg);
  };
  const int64_t nested_len = (d.rows * d.blocks() + 255) / 256;
  auto check = [&](ffi::AnyBuffer b, const char* name, ffi::DataType type, const char* type_name,
                   std::initializer_list<int64_t> want) -> ffi::Error {
    auto dims = b.dimensions();
    bool ok = b.element_type() == type && dims.size() == want.size();
    size_t i = 0;
    for (int64_t w : want) ok = ok && dims[i++] == w;
    if (ok) return ffi::Error::Success();
    std::string expected = std::string(type_name) + "[";
    i = 0;
    for (int64_t w : want) expected += (i++ ? ", " : "") + std::to_string(w);
    return err(std::string(name) + " must be " + expected + "], got " + DimsToString(dims));
  };
  if (auto e = check(codes, "absmax codes", ffi::DataType::U8, "uint8",
                     {d.groups, d.rows, d.blocks()});
      e.failure())
    return e;
  if (auto e = check(nested, "nested_absmax", ffi::DataType::F32, "float32",
                     {d.groups, nested_len});
      e.failure())
    return e;
  if (auto e = check(table, "table", ffi::DataType::F32, "float32", {d.groups, 256}); e.failure())
    return e;
  return check(offset, "offset", ffi::DataType::F32, "float32", {d.groups});
}

// The scale source of a plain or double-quantized weight, checked against dims.
inline ffi::Error MakeScales(const char* op, ffi::AnyBuffer absmax, const Nf4Dims& d,
                      PlainScales* scales) {
  if (auto e = CheckAbsmax(op, absmax, d); e.failure()) return e;
  *scales = {static_cast<const float*>(absmax.untyped_data())};
  return ffi::Error::Success();
}

inline ffi::Error MakeScales(const char* op, ffi::AnyBuffer codes, ffi::AnyBuffer nested,
                      ffi::AnyBuffer table, ffi::AnyBuffer offset, const Nf4Dims& d,
                      DoubleQuantScales* scales) {
  if (auto e = CheckDoubleQuantScales(op, codes, nested, table, offset, d); e.failure()) return e;
  *scales = {static_cast<const uint8_t*>(codes.untyped_data()),
             static_cast<const float*>(nested.untyped_data()),
             static_cast<const float*>(table.untyped_data()),
             static_cast<const float*>(offset.untyped_data()),
             nested.dimensions()[1]};
  return ffi::Error::Success();
}

// Checks packed and the scale operands of a weight (plain absmax, or the four double-quant
// operands) and returns fn(scales, dims) with the checked scale source: one handler body
// serves both forms.
template <typename Fn>
ffi::Error WithWeight(const char* op, ffi::AnyBuffer packed, int64_t block_size,
                      ffi::AnyBuffer absmax, Fn&& fn) {
  Nf4Dims d;
  PlainScales scales;
  if (auto e = CheckPacked(op, packed, block_size, &d); e.failure()) return e;
  if (auto e = MakeScales(op, absmax, d, &scales); e.failure()) return e;
  return fn(scales, d);
}

template <typename Fn>
ffi::Error WithWeight(const char* op, ffi::AnyBuffer packed, int64_t block_size,
                      ffi::AnyBuffer codes, ffi::AnyBuffer nested, ffi::AnyBuffer table,
                      ffi::AnyBuffer offset, Fn&& fn) {
  Nf4Dims d;
  DoubleQuantScales scales;
  if (auto e = CheckPacked(op, packed, block_size, &d); e.failure()) return e;
  if (auto e = MakeScales(op, codes, nested, table, offset, d, &scales); e.failure()) return e;
  return fn(scales, d);
}

// Checks a dense [G, N, K] tensor (quantize input or dequantize output) against dims.
inline ffi::Error CheckDense(const char* op, const char* name, ffi::AnyBuffer dense,
                             const Nf4Dims& dims) {
  auto dd = dense.dimensions();
  if (!IsActivationType(dense.element_type()))
    return ffi::Error::InvalidArgument(std::string(op) + ": " + name +
                                       " must be float32, bfloat16 or float16");
  if (dd.size() != 3 || dd[0] != dims.groups || dd[1] != dims.rows || dd[2] != dims.cols)
    return ffi::Error::InvalidArgument(
        std::string(op) + ": " + name + " must be [" + std::to_string(dims.groups) + ", " +
        std::to_string(dims.rows) + ", " + std::to_string(dims.cols) + "], got " +
        DimsToString(dd));
  return ffi::Error::Success();
}

// Checks the quantize input w [G, N, K] alone (there is no packed operand yet).
inline ffi::Error CheckQuantizeInput(ffi::AnyBuffer w, int64_t block_size, Nf4Dims* dims) {
  auto wd = w.dimensions();
  if (block_size <= 0)
    return ffi::Error::InvalidArgument("nf4_quantize: block_size must be positive, got " +
                                       std::to_string(block_size));
  if (wd.size() != 3)
    return ffi::Error::InvalidArgument("nf4_quantize: w must be [G, N, K], got " + DimsToString(wd));
  dims->groups = wd[0];
  dims->rows = wd[1];
  dims->cols = wd[2];
  dims->block_size = block_size;
  if (dims->rows % 2 != 0)
    return ffi::Error::InvalidArgument("nf4_quantize: N = " + std::to_string(dims->rows) +
                                       " must be even");
  if (dims->cols % block_size != 0)
    return ffi::Error::InvalidArgument("nf4_quantize: K = " + std::to_string(dims->cols) +
                                       " is not a multiple of block_size = " +
                                       std::to_string(block_size));
  return CheckDense("nf4_quantize", "w", w, *dims);
}

// Checks matmul activations x [G, M, K] and output [G, M, N]; returns M.
inline ffi::Error CheckMatmul(ffi::AnyBuffer x, ffi::AnyBuffer out, const Nf4Dims& dims,
                              int64_t* m) {
  auto xd = x.dimensions();
  auto od = out.dimensions();
  if (!IsActivationType(x.element_type()))
    return ffi::Error::InvalidArgument("nf4_matmul: x must be float32, bfloat16 or float16");
  if (out.element_type() != x.element_type())
    return ffi::Error::InvalidArgument("nf4_matmul: output dtype must equal x's dtype");
  if (xd.size() != 3 || xd[0] != dims.groups || xd[2] != dims.cols)
    return ffi::Error::InvalidArgument("nf4_matmul: x must be [" + std::to_string(dims.groups) +
                                       ", M, " + std::to_string(dims.cols) + "], got " +
                                       DimsToString(xd));
  *m = xd[1];
  if (od.size() != 3 || od[0] != dims.groups || od[1] != *m || od[2] != dims.rows)
    return ffi::Error::InvalidArgument("nf4_matmul: output must be [" +
                                       std::to_string(dims.groups) + ", " + std::to_string(*m) +
                                       ", " + std::to_string(dims.rows) + "], got " +
                                       DimsToString(od));
  return ffi::Error::Success();
}

}  // namespace jax_nf4
