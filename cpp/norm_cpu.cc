// CPU FFI handlers of jax_nf4.rms_norm and jax_nf4.add_rms_norm ("rms_norm", "add_rms_norm" in
// cpu_ops.cc's registrations()), per row of x [G, R, D] with group g's scale [D] (norm_math.h):
//   add_rms_norm:  sum = dtype(x + residual),  y = dtype(sum / rms(sum) * scale)
//   rms_norm:      y = dtype(x / rms(x) * scale)
// The rows are spread over XLA's intra-op threads. A row's sum of squares is taken in 8 float32
// lanes (element d in lane d % 8, each lane in order), then the lanes are added in order, so
// results do not depend on the threads or on the vector width.
#include <cstdint>
#include <vector>

#include "host_cpu.h"
#include "host_dtypes.h"
#include "norm_ffi_shapes.h"
#include "norm_math.h"
#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {
namespace {

constexpr int64_t kLanes = 8;

// Sum of squares of v[0 .. n), lane by lane as above.
float SumSquares(const float* v, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += v[j + l] * v[j + l];
  for (int64_t l = 0; j + l < n; ++l) lanes[l] += v[j + l] * v[j + l];
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// residual and sum are null for rms_norm.
template <typename T, typename S>
void NormRows(ffi::ThreadPool& pool, const NormDims& d, const T* x, const T* residual,
              const S* scale, float eps, T* y, T* sum) {
  const int64_t D = d.dim;
  ParallelFor(pool, d.groups * d.rows, 4 * D, [&](int64_t begin, int64_t end) {
    std::vector<float> s(D), g(D);
    int64_t group = -1;
    for (int64_t row = begin; row < end; ++row) {
      if (row / d.rows != group) {  // this group's scale in float32
        group = row / d.rows;
        for (int64_t j = 0; j < D; ++j) g[j] = ToFloat(scale[group * D + j]);
      }
      const int64_t base = row * D;
      for (int64_t j = 0; j < D; ++j) {
        if (residual) {
          const T rounded = FromFloat<T>(ToFloat(x[base + j]) + ToFloat(residual[base + j]));
          sum[base + j] = rounded;
          s[j] = ToFloat(rounded);
        } else {
          s[j] = ToFloat(x[base + j]);
        }
      }
      const float inv_rms = NormInvRms(SumSquares(s.data(), D), D, eps);
      for (int64_t j = 0; j < D; ++j) y[base + j] = FromFloat<T>(NormOutput(s[j], inv_rms, g[j]));
    }
  });
}

ffi::Error Norm(const char* op, ffi::ThreadPool& pool, ffi::AnyBuffer x,
                const ffi::AnyBuffer* residual, ffi::AnyBuffer scale, ffi::AnyBuffer y,
                ffi::AnyBuffer* sum, float eps) {
  NormDims d;
  if (auto e = CheckRmsNorm(op, x, residual, scale, y, sum, &d); e.failure()) return e;
  return DispatchActivation(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    (void)DispatchActivation(scale.element_type(), [&](auto scale_tag) {
      using S = typename decltype(scale_tag)::type;
      NormRows<T, S>(pool, d, static_cast<const T*>(x.untyped_data()),
                     residual ? static_cast<const T*>(residual->untyped_data()) : nullptr,
                     static_cast<const S*>(scale.untyped_data()), eps,
                     static_cast<T*>(y.untyped_data()),
                     sum ? static_cast<T*>(sum->untyped_data()) : nullptr);
    });
  });
}

ffi::Error RmsNormImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                       ffi::Result<ffi::AnyBuffer> y, float eps) {
  return Norm("rms_norm", pool, x, nullptr, scale, *y, nullptr, eps);
}

ffi::Error AddRmsNormImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer residual,
                          ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> y,
                          ffi::Result<ffi::AnyBuffer> sum, float eps) {
  return Norm("add_rms_norm", pool, x, &residual, scale, *y, &(*sum), eps);
}

}  // namespace
}  // namespace jax_nf4

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4RmsNormCpu, jax_nf4::RmsNormImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x [G, R, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // scale [G, D]
                                  .Ret<xla::ffi::AnyBuffer>()  // y [G, R, D]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4AddRmsNormCpu, jax_nf4::AddRmsNormImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x [G, R, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // residual [G, R, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // scale [G, D]
                                  .Ret<xla::ffi::AnyBuffer>()  // y [G, R, D]
                                  .Ret<xla::ffi::AnyBuffer>()  // sum = x + residual
                                  .Attr<float>("eps"));
