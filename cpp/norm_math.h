// The RMSNorm's math, once, for the CPU handler and the CUDA kernel (jax_nf4.rms_norm /
// add_rms_norm; jax_nf4.models.llama.RMSNorm computes the same with jnp):
//   s = dtype(float(x) + float(residual))            (add_rms_norm only; else s = x)
//   y = dtype((float(s) * inv_rms) * float(scale))    inv_rms = 1 / sqrt(sum(float(s)^2) / D + eps)
// every step in float32 (the sum of squares in an order each backend fixes).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NORM_HD __host__ __device__ __forceinline__
#else
#define NORM_HD inline
#endif

namespace jax_nf4 {

// 1 / rms of a row of `dim` elements whose squares sum to sum_squares, with IEEE sqrt and
// division (no approximate rsqrt), so both backends round it alike.
NORM_HD float NormInvRms(float sum_squares, int64_t dim, float eps) {
  return 1.0f / sqrtf(sum_squares / float(dim) + eps);
}

// One normalized element (before rounding to the dtype): the model's (s / rms) * scale order.
NORM_HD float NormOutput(float s, float inv_rms, float scale) { return (s * inv_rms) * scale; }

}  // namespace jax_nf4
