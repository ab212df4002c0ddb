// The decode-attention step's elementwise math, once, for the CPU handler and the CUDA kernel:
// the rotary embedding (Llama's half-split layout, as jax_nf4.models.llama.rope computes it, in
// float32) and the cache slot a step writes.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ATTN_HD __host__ __device__ __forceinline__
#else
#define ATTN_HD inline
#endif

namespace jax_nf4 {

// cos / sin of the rotary angle of pair i (dims i and i + head_dim / 2) at position pos:
// angle = float(pos) * theta^(-2i / head_dim), every step in float32.
struct RopeRotation {
  float cos, sin;
};

ATTN_HD RopeRotation RopeAt(int32_t pos, int i, int head_dim, float theta) {
  const float inv_freq = powf(theta, -float(2 * i) / float(head_dim));
  const float angle = float(pos) * inv_freq;
  return {cosf(angle), sinf(angle)};
}

// The rotated pair: (x1 cos - x2 sin, x2 cos + x1 sin).
ATTN_HD void Rotate(float x1, float x2, RopeRotation r, float* y1, float* y2) {
  *y1 = x1 * r.cos - x2 * r.sin;
  *y2 = x2 * r.cos + x1 * r.sin;
}

// The cache slot of the new key / value: pos clamped to [0, max_len - 1], as
// lax.dynamic_update_slice clamps its start. The step attends to slots 0 .. slot.
ATTN_HD int64_t DecodeSlot(int32_t pos, int64_t max_len) {
  return pos < 0 ? 0 : (pos >= max_len ? max_len - 1 : pos);
}

}  // namespace jax_nf4
