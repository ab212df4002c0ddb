// Shape and dtype checks of the RMSNorm ops, shared by their CPU and CUDA handlers:
//   x [G, R, D]  (residual [G, R, D])  scale [G, D]  ->  y [G, R, D]  (sum [G, R, D])
// x, residual and the results share one dtype (float32, bfloat16 or float16); scale is any of
// the three. The Python layer checks the same at trace time with friendlier messages.
#pragma once

#include <cstdint>
#include <string>

#include "nf4_ffi_shapes.h"
#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {

struct NormDims {
  int64_t groups = 0;  // G
  int64_t rows = 0;    // R
  int64_t dim = 0;     // D: the normalized (last) dim
};

// Checks the operands and results (residual and sum null for rms_norm); fills d.
inline ffi::Error CheckRmsNorm(const char* op, ffi::AnyBuffer x, const ffi::AnyBuffer* residual,
                               ffi::AnyBuffer scale, ffi::AnyBuffer y,
                               const ffi::AnyBuffer* sum, NormDims* d) {
  const ffi::DataType t = x.element_type();
  auto xd = x.dimensions();
  auto fail = [&](const std::string& what, ffi::AnyBuffer seen) {
    return ffi::Error::InvalidArgument(std::string(op) + ": " + what + ", got " +
                                       Typed(seen.element_type(), seen.dimensions()));
  };
  if (!IsActivationType(t)) return fail("x must be float32, bfloat16 or float16", x);
  if (xd.size() != 3) return fail("x must be [G, R, D] (rank 3)", x);
  d->groups = xd[0];
  d->rows = xd[1];
  d->dim = xd[2];
  if (d->dim < 1) return fail("x's last dim D must be >= 1", x);
  const std::string want = Typed(t, xd);
  if (residual && !Matches(*residual, t, {d->groups, d->rows, d->dim}))
    return fail("residual must be " + want + " like x", *residual);
  auto sd = scale.dimensions();
  if (!IsActivationType(scale.element_type()) || sd.size() != 2 || sd[0] != d->groups ||
      sd[1] != d->dim)
    return fail("scale must be float32, bfloat16 or float16 [G, D] = [" +
                    std::to_string(d->groups) + ", " + std::to_string(d->dim) + "]", scale);
  if (!Matches(y, t, {d->groups, d->rows, d->dim})) return fail("the output must be " + want, y);
  if (sum && !Matches(*sum, t, {d->groups, d->rows, d->dim}))
    return fail("the sum result must be " + want, *sum);
  return ffi::Error::Success();
}

}  // namespace jax_nf4
