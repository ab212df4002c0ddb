// CPU FFI handler of the fused single-token decode-attention step (`jax_nf4.decode_attention`),
// exported by cpu_ops.cc's registrations() as "decode_attention". One call, per batch row b and
// KV head h of qkv [B, H_kv, G + 2, D] (rows 0..G-1: the KV head's query heads, G: the new key,
// G + 1: the new value):
//   q_g = dtype(rot(qkv[b, h, g]))    k_new = dtype(rot(qkv[b, h, G]))    v_new = qkv[b, h, G + 1]
//   slot  = DecodeSlot(pos, T);  k_cache[b, slot, h] = k_new,  v_cache[b, slot, h] = v_new
//   out[b, h, g] = dtype(sum_{t <= slot} softmax_t(q_g . k[t] / sqrt(D)) v[t])
// with every step in float32 (rot: attention_math.h's RopeAt / Rotate). Slots after `slot` are
// never read. The caches are updated in place when XLA aliases them to the results (the
// lowering asks it to); otherwise the inputs are copied to the results first.
// The (b, h) pairs are spread over XLA's intra-op threads. Each score is one float32 dot
// product summed over d in order, each output element one sum over t in order, so results do
// not depend on the threads or on the vector width: the score loop runs across a tile of
// slots (transposed keys) and the value loop across d.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "attention_ffi_shapes.h"
#include "attention_math.h"
#include "host_cpu.h"
#include "host_dtypes.h"
#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {
namespace {

constexpr int64_t kSlotTile = 32;  // slots whose scores are computed together

// p[g * len + l] = (q_g . k_l) / sqrt_d for the n <= kSlotTile slots of a tile, from the tile's
// keys transposed (kt[d * kSlotTile + l], float32): each dot summed over d in order, the
// tile's slots in the vector lanes.
JAX_NF4_MULTIVERSION void ScoreTile(const float* q, int64_t groups, int64_t head_dim,
                                    const float* kt, int64_t n, float sqrt_d, float* p,
                                    int64_t len) {
  for (int64_t g = 0; g < groups; ++g) {
    float dot[kSlotTile] = {};
    const float* qg = q + g * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) {
      const float qd = qg[d];
      const float* kd = kt + d * kSlotTile;
      for (int64_t l = 0; l < kSlotTile; ++l) dot[l] += qd * kd[l];
    }
    for (int64_t l = 0; l < n; ++l) p[g * len + l] = dot[l] / sqrt_d;
  }
}

// acc[g][d] += p[g * len] * v[d] for the G heads, one value row v (float32).
JAX_NF4_MULTIVERSION void AccumulateValue(const float* v, const float* p, int64_t len,
                                          int64_t groups, int64_t head_dim, float* acc) {
  for (int64_t g = 0; g < groups; ++g) {
    const float pt = p[g * len];
    float* ag = acc + g * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) ag[d] += pt * v[d];
  }
}

template <typename T>
void DecodeAttention(ffi::ThreadPool& pool, const AttentionDims& d, const T* qkv, int32_t pos,
                     float theta, T* k_cache, T* v_cache, T* out) {
  const int64_t D = d.head_dim, half = D / 2, G = d.groups, H = d.kv_heads;
  const int64_t slot = DecodeSlot(pos, d.max_len), len = slot + 1;
  const float sqrt_d = sqrtf(float(D));
  std::vector<RopeRotation> rot(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    rot[i] = RopeAt(pos, static_cast<int>(i), static_cast<int>(D), theta);
  auto rotate = [&](const T* x, float* y) {
    for (int64_t i = 0; i < half; ++i)
      Rotate(ToFloat(x[i]), ToFloat(x[i + half]), rot[i], &y[i], &y[i + half]);
  };
  ParallelFor(pool, d.batch * H, 2 * (G + 1) * len * D, [&](int64_t begin, int64_t end) {
    std::vector<float> q(static_cast<size_t>(G * D));     // the rotated queries, dtype-rounded
    std::vector<float> row(static_cast<size_t>(D));       // the new key; a value row
    std::vector<float> kt(static_cast<size_t>(D * kSlotTile));  // a tile's keys, transposed
    std::vector<float> p(static_cast<size_t>(G * len));   // scores, then exp(s_t - max) [G, len]
    std::vector<float> acc(static_cast<size_t>(G * D));   // sum_t e_t v[t]
    std::vector<float> sums(static_cast<size_t>(G));      // sum_t e_t
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* in = qkv + bh * (G + 2) * D;
      auto cache_row = [&](T* cache, int64_t t) {
        return cache + ((b * d.max_len + t) * H + h) * D;
      };
      for (int64_t g = 0; g < G; ++g) {
        float* qg = q.data() + g * D;
        rotate(in + g * D, qg);
        for (int64_t j = 0; j < D; ++j) qg[j] = ToFloat(FromFloat<T>(qg[j]));
      }
      rotate(in + G * D, row.data());
      T* k_slot = cache_row(k_cache, slot);
      T* v_slot = cache_row(v_cache, slot);
      for (int64_t j = 0; j < D; ++j) k_slot[j] = FromFloat<T>(row[j]);
      for (int64_t j = 0; j < D; ++j) v_slot[j] = in[(G + 1) * D + j];
      // Scores, a tile of slots at a time (the unused lanes of a last partial tile hold keys
      // of an earlier tile: their scores are not kept).
      for (int64_t t0 = 0; t0 < len; t0 += kSlotTile) {
        const int64_t n = std::min(kSlotTile, len - t0);
        for (int64_t l = 0; l < n; ++l) {
          const T* kl = cache_row(k_cache, t0 + l);
          for (int64_t j = 0; j < D; ++j) kt[j * kSlotTile + l] = ToFloat(kl[j]);
        }
        ScoreTile(q.data(), G, D, kt.data(), n, sqrt_d, p.data() + t0, len);
      }
      // Softmax over t, per query head (normalized at the end, as the CUDA kernel does).
      for (int64_t g = 0; g < G; ++g) {
        float* pg = p.data() + g * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) m = pg[t] > m ? pg[t] : m;
        float sum = 0.0f;
        for (int64_t t = 0; t < len; ++t) {
          pg[t] = expf(pg[t] - m);
          sum += pg[t];
        }
        sums[g] = sum;
      }
      // out = sum_t e_t v[t] / sum_t e_t: each value row converted once.
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const T* vt = cache_row(v_cache, t);
        for (int64_t j = 0; j < D; ++j) row[j] = ToFloat(vt[j]);
        AccumulateValue(row.data(), p.data() + t, len, G, D, acc.data());
      }
      T* o = out + bh * G * D;
      for (int64_t i = 0; i < G * D; ++i) o[i] = FromFloat<T>(acc[i] / sums[i / D]);
    }
  });
}

// The result starts as a copy of the operand unless XLA gave both the same buffer.
void CopyIfDistinct(ffi::AnyBuffer in, ffi::AnyBuffer& out) {
  if (out.untyped_data() != in.untyped_data() && in.size_bytes() > 0)
    std::memcpy(out.untyped_data(), in.untyped_data(), in.size_bytes());
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::AnyBuffer k_cache,
                               ffi::AnyBuffer v_cache, ffi::AnyBuffer pos,
                               ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> k_out,
                               ffi::Result<ffi::AnyBuffer> v_out, float rope_theta) {
  AttentionDims d;
  if (auto e = CheckDecodeAttention(qkv, k_cache, v_cache, pos, *out, *k_out, *v_out, &d);
      e.failure())
    return e;
  CopyIfDistinct(k_cache, *k_out);
  CopyIfDistinct(v_cache, *v_out);
  if (d.batch * d.kv_heads == 0) return ffi::Error::Success();
  const int32_t p = *static_cast<const int32_t*>(pos.untyped_data());
  return DispatchActivation(qkv.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    DecodeAttention<T>(pool, d, static_cast<const T*>(qkv.untyped_data()), p, rope_theta,
                       static_cast<T*>(k_out->untyped_data()),
                       static_cast<T*>(v_out->untyped_data()),
                       static_cast<T*>(out->untyped_data()));
  });
}

}  // namespace
}  // namespace jax_nf4

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4DecodeAttentionCpu, jax_nf4::DecodeAttentionImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // qkv [B, H_kv, G + 2, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // k_cache [B, T, H_kv, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // v_cache [B, T, H_kv, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // pos int32 scalar
                                  .Ret<xla::ffi::AnyBuffer>()  // out [B, H_kv, G, D]
                                  .Ret<xla::ffi::AnyBuffer>()  // k_cache (aliases the operand)
                                  .Ret<xla::ffi::AnyBuffer>()  // v_cache (aliases the operand)
                                  .Attr<float>("rope_theta"));
