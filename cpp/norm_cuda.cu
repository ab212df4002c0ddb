// CUDA FFI handlers of jax_nf4.rms_norm and jax_nf4.add_rms_norm (math in norm_math.h). One CTA
// per row of x [G, R, D], a thread per 16 bytes of the row (up to 1024 threads; more bytes
// loop): pass 1 forms the row (x + residual rounded to the dtype, written out as the sum) and
// its sum of squares, added over the CTA in a fixed tree (warp shuffles, then the warps' sums in
// warp order): bit-stable results; pass 2 forms the row again (its reads hit L1) and writes the
// normalized row. Decode-sized rows take one kernel where XLA runs a reduce and an elementwise
// kernel per norm.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda_dtypes.cuh"
#include "norm_ffi_shapes.h"
#include "norm_math.h"
#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {
namespace {

constexpr int kNormMaxThreads = 1024;

struct NormArgs {
  const void* x;         // [G, R, D]
  const void* residual;  // [G, R, D] or null (rms_norm)
  const void* scale;     // [G, D]
  void* y;               // [G, R, D]
  void* sum;             // [G, R, D] or null (rms_norm)
  int64_t rows, dim;     // R, D
  float eps;
};

// V consecutive elements, loaded / stored as one access (16 bytes where V * sizeof(T) is).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, typename S, int V>
__global__ void __launch_bounds__(kNormMaxThreads) RmsNormKernel(NormArgs a) {
  __shared__ float warp_sums[kNormMaxThreads / 32];
  const int64_t D = a.dim, row = blockIdx.x, base = row * D;
  const S* scale = static_cast<const S*>(a.scale) + row / a.rows * D;
  const int64_t step = int64_t(blockDim.x) * V;
  // Elements [i, i + V) of the row to normalize: x, or x + residual rounded to T.
  auto load = [&](int64_t i) {
    Vec<T, V> s = *reinterpret_cast<const Vec<T, V>*>(static_cast<const T*>(a.x) + base + i);
    if (a.residual) {
      const Vec<T, V> r =
          *reinterpret_cast<const Vec<T, V>*>(static_cast<const T*>(a.residual) + base + i);
#pragma unroll
      for (int k = 0; k < V; ++k) s.v[k] = FromFloat<T>(ToFloat(s.v[k]) + ToFloat(r.v[k]));
    }
    return s;
  };

  float squares = 0.0f;
  for (int64_t i = threadIdx.x * V; i < D; i += step) {
    const Vec<T, V> s = load(i);
    if (a.sum) *reinterpret_cast<Vec<T, V>*>(static_cast<T*>(a.sum) + base + i) = s;
#pragma unroll
    for (int k = 0; k < V; ++k) squares += ToFloat(s.v[k]) * ToFloat(s.v[k]);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, o);
  if (lane == 0) warp_sums[warp] = squares;
  __syncthreads();
  if (warp == 0) {
    squares = lane < warps ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, o);
    if (lane == 0) warp_sums[0] = squares;
  }
  __syncthreads();
  const float inv_rms = NormInvRms(warp_sums[0], D, a.eps);

  for (int64_t i = threadIdx.x * V; i < D; i += step) {
    const Vec<T, V> s = load(i);
    Vec<T, V> y;
#pragma unroll
    for (int k = 0; k < V; ++k)
      y.v[k] = FromFloat<T>(NormOutput(ToFloat(s.v[k]), inv_rms, ToFloat(scale[i + k])));
    *reinterpret_cast<Vec<T, V>*>(static_cast<T*>(a.y) + base + i) = y;
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, typename S>
cudaError_t LaunchRmsNorm(cudaStream_t stream, const NormArgs& a, int64_t rows) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector = a.dim % kVec == 0 && Aligned16(a.x) && Aligned16(a.y) &&
                      (!a.residual || (Aligned16(a.residual) && Aligned16(a.sum)));
  const int64_t accesses = vector ? a.dim / kVec : a.dim;
  const int threads = int(std::clamp<int64_t>((accesses + 31) / 32 * 32, 32, kNormMaxThreads));
  if (vector) {
    RmsNormKernel<T, S, kVec><<<unsigned(rows), threads, 0, stream>>>(a);
  } else {
    RmsNormKernel<T, S, 1><<<unsigned(rows), threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

ffi::Error NormCuda(const char* op, cudaStream_t stream, ffi::AnyBuffer x,
                    const ffi::AnyBuffer* residual, ffi::AnyBuffer scale, ffi::AnyBuffer y,
                    ffi::AnyBuffer* sum, float eps) {
  NormDims d;
  if (auto e = CheckRmsNorm(op, x, residual, scale, y, sum, &d); e.failure()) return e;
  const int64_t rows = d.groups * d.rows;
  if (rows == 0) return ffi::Error::Success();
  if (rows > 0x7fffffff)
    return ffi::Error::InvalidArgument(std::string(op) + ": " + std::to_string(rows) +
                                       " rows (G x R) exceed one launch's 2^31 - 1 CTAs");
  const NormArgs a{x.untyped_data(), residual ? residual->untyped_data() : nullptr,
                   scale.untyped_data(), y.untyped_data(), sum ? sum->untyped_data() : nullptr,
                   d.rows, d.dim, eps};
  const cudaError_t err = DispatchActivation(x.element_type(), [&](auto t) {
    return DispatchActivation(scale.element_type(), [&](auto s) {
      return LaunchRmsNorm<decltype(t), decltype(s)>(stream, a, rows);
    });
  });
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string(op) + ": CUDA launch failed: " +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error RmsNormCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                       ffi::Result<ffi::AnyBuffer> y, float eps) {
  return NormCuda("rms_norm", stream, x, nullptr, scale, *y, nullptr, eps);
}

ffi::Error AddRmsNormCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer residual,
                          ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> y,
                          ffi::Result<ffi::AnyBuffer> sum, float eps) {
  return NormCuda("add_rms_norm", stream, x, &residual, scale, *y, &(*sum), eps);
}

}  // namespace
}  // namespace jax_nf4

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4RmsNormCuda, jax_nf4::RmsNormCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x [G, R, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // scale [G, D]
                                  .Ret<xla::ffi::AnyBuffer>()  // y [G, R, D]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4AddRmsNormCuda, jax_nf4::AddRmsNormCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x [G, R, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // residual [G, R, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // scale [G, D]
                                  .Ret<xla::ffi::AnyBuffer>()  // y [G, R, D]
                                  .Ret<xla::ffi::AnyBuffer>()  // sum = x + residual
                                  .Attr<float>("eps"));
