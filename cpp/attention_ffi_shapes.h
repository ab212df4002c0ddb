// Shape and dtype checks of the decode-attention step, shared by its CPU and CUDA handlers:
//   qkv     [B, H_kv, G + 2, D]  (per KV head: G query heads, the new key, the new value)
//   k_cache [B, T, H_kv, D]      v_cache [B, T, H_kv, D]      pos int32 []
//   out     [B, H_kv, G, D]      (and the caches, updated at slot pos)
// qkv, the caches and out share one dtype: float32, bfloat16 or float16.
// The Python layer checks the same at trace time with friendlier messages; these checks make
// the handlers safe on their own.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "nf4_ffi_shapes.h"
#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {

struct AttentionDims {
  int64_t batch = 0;     // B
  int64_t kv_heads = 0;  // H_kv
  int64_t groups = 0;    // G: query heads per KV head
  int64_t head_dim = 0;  // D (even)
  int64_t max_len = 0;   // T: cache slots
};

inline ffi::Error InvalidAttentionArgument(const std::string& msg) {
  return ffi::Error::InvalidArgument("decode_attention: " + msg);
}

inline const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::S32: return "int32";
    default: return "an unsupported dtype";
  }
}

// A buffer's dtype and dims, e.g. "bfloat16[1, 8, 6, 128]".
template <typename Dims>
std::string Typed(ffi::DataType t, const Dims& dims) {
  return std::string(DtypeName(t)) + DimsToString(dims);
}

inline bool Matches(ffi::AnyBuffer b, ffi::DataType t, std::initializer_list<int64_t> want) {
  auto dims = b.dimensions();
  if (b.element_type() != t || dims.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want)
    if (dims[i++] != w) return false;
  return true;
}

// Checks every operand and result against qkv's shape; fills dims.
inline ffi::Error CheckDecodeAttention(ffi::AnyBuffer qkv, ffi::AnyBuffer k_cache,
                                       ffi::AnyBuffer v_cache, ffi::AnyBuffer pos,
                                       ffi::AnyBuffer out, ffi::AnyBuffer k_out,
                                       ffi::AnyBuffer v_out, AttentionDims* d) {
  const ffi::DataType t = qkv.element_type();
  auto qd = qkv.dimensions();
  auto fail = [&](const std::string& what, ffi::AnyBuffer seen) {
    return InvalidAttentionArgument(what + ", got " + Typed(seen.element_type(),
                                                            seen.dimensions()));
  };
  if (!IsActivationType(t)) return fail("qkv must be float32, bfloat16 or float16", qkv);
  if (qd.size() != 4) return fail("qkv must be [B, H_kv, G + 2, D] (rank 4)", qkv);
  d->batch = qd[0];
  d->kv_heads = qd[1];
  d->groups = qd[2] - 2;
  d->head_dim = qd[3];
  if (d->groups < 1)
    return fail("qkv's dim 2 (G + 2: G query heads, the new key, the new value) must be >= 3",
                qkv);
  if (d->head_dim < 2 || d->head_dim % 2)
    return fail("qkv's head_dim D (last dim) must be even and positive (rotary pairs)", qkv);
  // [B, T, H_kv, D] with qkv's B, H_kv and D; T (the slot count) from k_cache.
  auto cache_of = [&](const std::string& slots) {
    return "[B, T, H_kv, D] = " + std::string(DtypeName(t)) + "[" + std::to_string(d->batch) +
           ", " + slots + ", " + std::to_string(d->kv_heads) + ", " +
           std::to_string(d->head_dim) + "] (qkv is " + Typed(t, qd) + ")";
  };
  auto kd = k_cache.dimensions();
  if (kd.size() != 4) return fail("k_cache must be " + cache_of("T"), k_cache);
  d->max_len = kd[1];
  const std::initializer_list<int64_t> cache = {d->batch, d->max_len, d->kv_heads, d->head_dim};
  const std::string want_cache = cache_of(std::to_string(d->max_len));
  if (!Matches(k_cache, t, cache)) return fail("k_cache must be " + want_cache, k_cache);
  if (d->max_len < 1) return fail("the cache needs at least one slot (T >= 1)", k_cache);
  if (!Matches(v_cache, t, cache)) return fail("v_cache must be " + want_cache, v_cache);
  if (!Matches(pos, ffi::DataType::S32, {})) return fail("pos must be an int32 scalar", pos);
  const std::initializer_list<int64_t> heads = {d->batch, d->kv_heads, d->groups, d->head_dim};
  if (!Matches(out, t, heads)) return fail("the output must be " + Typed(t, heads), out);
  if (!Matches(k_out, t, cache)) return fail("the k_cache result must be " + want_cache, k_out);
  if (!Matches(v_out, t, cache)) return fail("the v_cache result must be " + want_cache, v_out);
  return ffi::Error::Success();
}

}  // namespace jax_nf4
