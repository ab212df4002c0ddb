// CUDA FFI handler of the decode-attention step (one new token per sequence): rotary embedding
// of the queries and the new key, the cache write of the new key / value, and grouped-query
// attention over the cache slots 0 .. slot, in one kernel (plus a combine kernel when the cache
// is longer than one chunk). Semantics in attention_math.h / jax_nf4.ops.decode_attention.
//
// A CTA of 1024 threads owns one (sequence b, KV head h, chunk of up to kAttnMaxChunk cache
// slots) and the KV head's G query heads: it copies its qkv rows and the chunk's key and value
// rows into shared memory (cp.async, all in flight at once), rotates the queries (and, in the
// chunk holding the slot, the new key, written to the cache with the new value), scores the
// slots (a thread per (head, slot)), takes each head's softmax statistics (a warp per head)
// and the probability-weighted values (warps split the slots, lanes the head dim; the warps'
// sums added in order). With one chunk (caches up to 256 slots) that is the output; with
// several, each chunk's (weighted values, max, sum) go to FFI scratch and a second kernel
// combines them in chunk order. Every sum runs in a fixed order: results are bit-stable.
// 8B decode step (B = 1, 8 KV heads of 4 queries, 144 slots, bf16, H100): 7.9 µs, about 4 µs
// less than XLA's kernels for the same step (bench/NOTES.md, session 16).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "attention_ffi_shapes.h"
#include "attention_math.h"
#include "cuda_dtypes.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {
namespace {

constexpr int kAttnThreads = 1024;  // one CTA per SM: enough warps to hide the latencies
constexpr int kHeadsPerPass = 8;     // query heads whose value sums a thread holds at once
constexpr int kAttnMaxChunk = 256;           // cache slots per CTA at most
constexpr int kAttnSharedBudget = 160 << 10;  // bytes of shared memory a CTA may take

struct AttentionArgs {
  const void* qkv;  // [B, H, G + 2, D]
  void* k_cache;
  void* v_cache;  // [B, L, H, D] (L = max_len slots): slots < slot read, slot `slot` written
  const int32_t* pos;
  void* out;       // [B, H, G, D]
  float* partial;  // chunks > 1: [chunks, B, H, G, D + 2] (weighted values, max, sum)
  int64_t batch, heads, groups, head_dim, max_len;
  int chunk;   // cache slots per CTA (a multiple of 32)
  int chunks;  // ceil(max_len / chunk)
  int row;     // elements between staged cache rows in shared memory: D + 16 bytes' worth
  int sum_warps;  // warps splitting the value sums: their sums fit where the key rows were
  float theta;
};

// Shared memory of a CTA: the chunk's key and value rows [chunk][row] in T, the qkv rows of
// its KV head [G + 2][D] in T (padded to 16 bytes), the rotated queries q[G][D] (float32 of
// the dtype-rounded values), the scores / probabilities p[G][chunk], each head's max and sum.
__host__ __device__ size_t QkvSharedBytes(int64_t groups, int64_t head_dim, size_t elem_bytes) {
  return (size_t(groups + 2) * size_t(head_dim) * elem_bytes + 15) / 16 * 16;
}
// The key rows' region also takes the warps' value sums at the end: at least one warp's.
__host__ __device__ size_t KeyRegionBytes(int64_t groups, int64_t head_dim, int64_t chunk,
                                          int64_t row, size_t elem_bytes) {
  const size_t keys = size_t(chunk) * size_t(row) * elem_bytes;
  const size_t sums = sizeof(float) * size_t(groups * head_dim);
  return ((keys > sums ? keys : sums) + 15) / 16 * 16;
}
size_t AttentionSharedBytes(int64_t groups, int64_t head_dim, int64_t chunk, int64_t row,
                            size_t elem_bytes) {
  return KeyRegionBytes(groups, head_dim, chunk, row, elem_bytes) +
         size_t(chunk) * size_t(row) * elem_bytes +
         QkvSharedBytes(groups, head_dim, elem_bytes) +
         sizeof(float) * size_t(groups * head_dim + groups * chunk + 2 * groups);
}

// 16 bytes from global to shared memory without a register (sm_80+): every copy of the chunk
// is in flight at once.
__device__ __forceinline__ void CopyAsync16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src));
}

// V: elements per 16-byte access of a cache row where D * sizeof(T) allows it, else 1.
template <typename T, int V>
__global__ void __launch_bounds__(kAttnThreads) DecodeAttentionKernel(AttentionArgs a) {
  constexpr bool kCopy16 = V * sizeof(T) == 16;  // 16-byte rows: cp.async copies and reads
  extern __shared__ __align__(16) unsigned char shared[];
  const int64_t D = a.head_dim, G = a.groups, H = a.heads, L = a.max_len;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int chunk = blockIdx.x, C = a.chunk, R = a.row;
  T* ks = reinterpret_cast<T*>(shared);  // [C][R]
  T* vs = reinterpret_cast<T*>(shared + KeyRegionBytes(G, D, C, R, sizeof(T)));  // [C][R]
  T* xs = vs + int64_t(C) * R;            // [G + 2][D]: this KV head's qkv rows
  float* q = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(xs) +
                                      QkvSharedBytes(G, D, sizeof(T)));  // [G][D]
  float* p = q + G * D;                  // [G][C]
  float* stats = p + G * C;              // max[G], sum[G]
  // The qkv rows go out first (their copies in flight while pos is read), then the chunk's
  // cache rows below: every copy in flight at once.
  const T* qkv = static_cast<const T*>(a.qkv) + (b * H + h) * (G + 2) * D;
  if constexpr (kCopy16) {
    for (int64_t i = threadIdx.x; i < (G + 2) * D / V; i += kAttnThreads)
      CopyAsync16(xs + i * V, qkv + i * V);
    asm volatile("cp.async.commit_group;");
  } else {
    for (int64_t i = threadIdx.x; i < (G + 2) * D; i += kAttnThreads) xs[i] = qkv[i];
  }
  const int32_t pos = *a.pos;
  const int64_t slot = DecodeSlot(pos, L);
  const int64_t t0 = int64_t(chunk) * C;
  const int64_t t1 = t0 + C < slot + 1 ? t0 + C : slot + 1;
  const int n = int(t1 - t0);
  const int64_t partial_base = ((int64_t(chunk) * a.batch + b) * H + h) * G;  // head g: + g

  if (n <= 0) {  // no slot of this chunk is attended: an empty partial (chunk 0 never is)
    if constexpr (kCopy16) asm volatile("cp.async.wait_all;");
    for (int64_t i = threadIdx.x; i < G * (D + 2); i += kAttnThreads) {
      const int64_t g = i / (D + 2), e = i % (D + 2);
      a.partial[(partial_base + g) * (D + 2) + e] = e == D ? -INFINITY : 0.0f;
    }
    return;
  }

  // The chunk's cache rows into shared memory (the slot's old row too: replaced below).
  const int64_t row_stride = H * D;  // between consecutive cache slots
  const int64_t cache_base = b * L * row_stride + h * D;
  T* k_cache = static_cast<T*>(a.k_cache) + cache_base;
  T* v_cache = static_cast<T*>(a.v_cache) + cache_base;
  if constexpr (kCopy16) {
    const int per_row = int(D / V);
    for (int i = threadIdx.x; i < n * per_row; i += kAttnThreads) {
      const int j = i / per_row, c = i % per_row;
      CopyAsync16(ks + j * R + c * V, k_cache + (t0 + j) * row_stride + c * V);
      CopyAsync16(vs + j * R + c * V, v_cache + (t0 + j) * row_stride + c * V);
    }
    asm volatile("cp.async.commit_group;");
  } else {
    for (int64_t i = threadIdx.x; i < n * D; i += kAttnThreads) {
      const int64_t j = i / D, d = i % D;
      ks[j * R + d] = k_cache[(t0 + j) * row_stride + d];
      vs[j * R + d] = v_cache[(t0 + j) * row_stride + d];
    }
  }

  // While the cache rows are in flight: the rotary embedding of the G queries and the new key
  // (rounded to T, as the model's rope returns them; the key in place in its qkv row). The
  // CTA of the slot's chunk writes the new key and value to the cache, and once the staged
  // rows have landed, over the slot's old row there (its copy may have read either).
  if constexpr (kCopy16) asm volatile("cp.async.wait_group 1;");
  __syncthreads();  // the qkv rows have landed
  const int64_t half = D / 2;
  const bool owns_slot = slot < t1;
  for (int e = threadIdx.x; e < int((G + 1) * half); e += kAttnThreads) {  // (row g, pair i)
    const int g = e / int(half), i = e % int(half);
    float y1, y2;
    Rotate(ToFloat(xs[g * D + i]), ToFloat(xs[g * D + i + half]),
           RopeAt(pos, i, int(D), a.theta), &y1, &y2);
    const T r1 = FromFloat<T>(y1), r2 = FromFloat<T>(y2);
    if (g < G) {
      q[g * D + i] = ToFloat(r1);
      q[g * D + i + half] = ToFloat(r2);
    } else if (owns_slot) {
      xs[g * D + i] = k_cache[slot * row_stride + i] = r1;
      xs[g * D + i + half] = k_cache[slot * row_stride + i + half] = r2;
    }
  }
  if (owns_slot) {
    for (int64_t d = threadIdx.x; d < D; d += kAttnThreads)
      v_cache[slot * row_stride + d] = xs[(G + 1) * D + d];
  }
  if constexpr (kCopy16) asm volatile("cp.async.wait_all;");
  __syncthreads();  // the staged rows have landed, the new key is rotated
  if (owns_slot) {
    for (int64_t d = threadIdx.x; d < D; d += kAttnThreads) {
      ks[(slot - t0) * R + d] = xs[G * D + d];
      vs[(slot - t0) * R + d] = xs[(G + 1) * D + d];
    }
  }
  __syncthreads();

  // Scores: a thread per (head, slot), consecutive threads on consecutive slots of one head:
  // key rows read 16 bytes at a time (rows R apart, so the 8 threads of a shared-memory phase
  // hit distinct banks), the head's query alike for every thread of a warp (broadcasts).
  const float sqrt_d = sqrtf(float(D));
  for (int e = threadIdx.x; e < int(G) * n; e += kAttnThreads) {
    const int g = e / n, j = e % n;
    const T* kr = ks + int64_t(j) * R;
    const float* qg = q + g * D;
    float dot = 0.0f;
#pragma unroll 4
    for (int64_t d0 = 0; d0 < D; d0 += V) {
      float kv[V];
      if constexpr (kCopy16) {
        const uint4 raw = *reinterpret_cast<const uint4*>(kr + d0);
        const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int v = 0; v < V; ++v) kv[v] = ToFloat(x[v]);
#pragma unroll
        for (int v = 0; v < V; v += 4) {
          const float4 q4 = *reinterpret_cast<const float4*>(qg + d0 + v);
          dot = fmaf(q4.x, kv[v], dot);
          dot = fmaf(q4.y, kv[v + 1], dot);
          dot = fmaf(q4.z, kv[v + 2], dot);
          dot = fmaf(q4.w, kv[v + 3], dot);
        }
      } else {
        dot = fmaf(qg[d0], ToFloat(kr[d0]), dot);
      }
    }
    p[g * C + j] = dot / sqrt_d;
  }
  __syncthreads();

  // The chunk's softmax statistics per head (a warp per head): max, exp(s - max), their sum.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t g = warp; g < G; g += kAttnThreads / 32) {
    float* pg = p + g * C;
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, pg[i]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.0f;
    for (int i = lane; i < n; i += 32) {
      const float e = expf(pg[i] - m);
      pg[i] = e;
      l += e;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) stats[g] = m, stats[G + g] = l;
  }
  __syncthreads();

  // Probability-weighted values: warp w sums slots [n w / W, n (w + 1) / W), its lanes across
  // value pairs (d, d + 1) and up to kHeadsPerPass heads at once, into sums[w][G][D] (over the
  // key rows, no longer needed); then a thread per (head, dim) adds the W warps' sums in order.
  const int W = a.sum_warps;
  float* sums = reinterpret_cast<float*>(ks);
  if (warp < W) {
    const int j0 = n * warp / W, j1 = n * (warp + 1) / W;
    for (int g0 = 0; g0 < int(G); g0 += kHeadsPerPass) {
      const int gn = int(G) - g0 < kHeadsPerPass ? int(G) - g0 : kHeadsPerPass;
      for (int d = 2 * lane; d < int(D); d += 64) {
        float acc[kHeadsPerPass][2] = {};
        for (int j = j0; j < j1; ++j) {
          const T* vj = vs + int64_t(j) * R + d;
          const float v0 = ToFloat(vj[0]), v1 = ToFloat(vj[1]);
#pragma unroll
          for (int g = 0; g < kHeadsPerPass; ++g) {
            if (g < gn) {
              const float pj = p[(g0 + g) * C + j];
              acc[g][0] = fmaf(pj, v0, acc[g][0]);
              acc[g][1] = fmaf(pj, v1, acc[g][1]);
            }
          }
        }
#pragma unroll
        for (int g = 0; g < kHeadsPerPass; ++g) {
          if (g < gn) {
            float* out = sums + (int64_t(warp) * G + g0 + g) * D + d;
            out[0] = acc[g][0];
            out[1] = acc[g][1];
          }
        }
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < int(G * D); e += kAttnThreads) {
    const int g = e / int(D), d = e % int(D);
    float sum = sums[e];
    for (int w = 1; w < W; ++w) sum += sums[int64_t(w) * G * D + e];
    if (a.chunks == 1) {
      static_cast<T*>(a.out)[((b * H + h) * G + g) * D + d] = FromFloat<T>(sum / stats[G + g]);
    } else {
      float* partial = a.partial + (partial_base + g) * (D + 2);
      partial[d] = sum;
      if (d == 0) partial[D] = stats[g], partial[D + 1] = stats[G + g];
    }
  }
}

// Combines the chunks' partials of one (b, h) in chunk order: out = sum_c e_c acc_c / sum_c
// e_c l_c with e_c = exp(m_c - max_c m_c); empty chunks (m = -inf) weigh 0.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads) CombineChunksKernel(AttentionArgs a) {
  const int64_t D = a.head_dim, G = a.groups, H = a.heads;
  const int64_t b = blockIdx.y, h = blockIdx.x;
  for (int64_t i = threadIdx.x; i < G * D; i += kAttnThreads) {
    const int64_t g = i / D, d = i % D;
    auto part = [&](int c) {
      return a.partial + (((int64_t(c) * a.batch + b) * H + h) * G + g) * (D + 2);
    };
    float m = -INFINITY;
    for (int c = 0; c < a.chunks; ++c) m = fmaxf(m, part(c)[D]);
    float acc = 0.0f, l = 0.0f;
    for (int c = 0; c < a.chunks; ++c) {
      const float* pc = part(c);
      const float e = pc[D] == -INFINITY ? 0.0f : expf(pc[D] - m);
      acc += e * pc[d];
      l += e * pc[D + 1];
    }
    static_cast<T*>(a.out)[((b * H + h) * G + g) * D + d] = FromFloat<T>(acc / l);
  }
}

template <typename T>
ffi::Error LaunchDecodeAttention(cudaStream_t stream, const AttentionArgs& a, size_t smem) {
  constexpr int kVec = 16 / sizeof(T);
  auto kernel = a.head_dim % kVec == 0 ? DecodeAttentionKernel<T, kVec>
                                       : DecodeAttentionKernel<T, 1>;
  // The most shared memory per SM, as the GEMV kernels around it in a decode step take: the SM
  // then need not change its L1 / shared memory split between them.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         cudaSharedmemCarveoutMaxShared);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err == cudaSuccess) {
    kernel<<<dim3(unsigned(a.chunks), unsigned(a.heads), unsigned(a.batch)), kAttnThreads, smem,
             stream>>>(a);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess && a.chunks > 1) {
    CombineChunksKernel<T><<<dim3(unsigned(a.heads), unsigned(a.batch)), kAttnThreads, 0,
                             stream>>>(a);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("decode_attention: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionCuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                               ffi::AnyBuffer qkv, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                               ffi::AnyBuffer pos, ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::AnyBuffer> k_out,
                               ffi::Result<ffi::AnyBuffer> v_out, float rope_theta) {
  AttentionDims d;
  if (auto e = CheckDecodeAttention(qkv, k_cache, v_cache, pos, *out, *k_out, *v_out, &d);
      e.failure())
    return e;
  if (d.batch == 0 || d.kv_heads == 0) return ffi::Error::Success();
  if (d.batch > 65535 || d.kv_heads > 65535)
    return ffi::Error::InvalidArgument(
        "decode_attention: at most 65535 sequences and KV heads per call, got B = " +
        std::to_string(d.batch) + ", H_kv = " + std::to_string(d.kv_heads));
  // Slots per CTA: as many as the shared memory budget holds (a multiple of 32, at most
  // kAttnMaxChunk, no more than the cache has).
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const size_t elem = qkv.element_type() == ffi::DataType::F32 ? 4 : 2;
  const int64_t row = d.head_dim + int64_t(16 / elem);
  const size_t budget = optin < kAttnSharedBudget ? size_t(optin) : size_t(kAttnSharedBudget);
  int64_t chunk = std::min<int64_t>(kAttnMaxChunk, (d.max_len + 31) / 32 * 32);
  while (chunk > 32 && AttentionSharedBytes(d.groups, d.head_dim, chunk, row, elem) > budget)
    chunk -= 32;
  if (AttentionSharedBytes(d.groups, d.head_dim, chunk, row, elem) > budget)
    return ffi::Error::InvalidArgument(
        "decode_attention: " + std::to_string(d.groups) + " query heads per KV head of dim " +
        std::to_string(d.head_dim) + " leave no room for " + std::to_string(chunk) +
        " cache slots in " + std::to_string(budget) + " bytes of shared memory");
  // The cache results alias the operands (the lowering asks XLA for it); copy where they do not.
  for (auto [in, res] : {std::pair{&k_cache, &k_out}, std::pair{&v_cache, &v_out}}) {
    if ((*res)->untyped_data() != in->untyped_data()) {
      cudaError_t err = cudaMemcpyAsync((*res)->untyped_data(), in->untyped_data(),
                                        in->size_bytes(), cudaMemcpyDeviceToDevice, stream);
      if (err != cudaSuccess)
        return ffi::Error::Internal(std::string("decode_attention: cache copy: ") +
                                    cudaGetErrorString(err));
    }
  }
  const int64_t sum_warps = std::clamp<int64_t>(
      int64_t(KeyRegionBytes(d.groups, d.head_dim, chunk, row, elem)) /
          (d.groups * d.head_dim * int64_t(sizeof(float))),
      1, kAttnThreads / 32);
  AttentionArgs a{qkv.untyped_data(), k_out->untyped_data(), v_out->untyped_data(),
                  static_cast<const int32_t*>(pos.untyped_data()), out->untyped_data(), nullptr,
                  d.batch, d.kv_heads, d.groups, d.head_dim, d.max_len, int(chunk),
                  int((d.max_len + chunk - 1) / chunk), int(row), int(sum_warps), rope_theta};
  if (a.chunks > 1) {
    const size_t bytes = sizeof(float) * size_t(a.chunks) *
                         size_t(d.batch * d.kv_heads * d.groups) * size_t(d.head_dim + 2);
    auto buffer = scratch.Allocate(bytes, 16);
    if (!buffer.has_value())
      return ffi::Error::Internal("decode_attention: could not allocate " +
                                  std::to_string(bytes) + " bytes of scratch for chunk partials");
    a.partial = static_cast<float*>(buffer.value());
  }
  const size_t smem = AttentionSharedBytes(d.groups, d.head_dim, chunk, row, elem);
  switch (qkv.element_type()) {
    case ffi::DataType::F32: return LaunchDecodeAttention<float>(stream, a, smem);
    case ffi::DataType::BF16: return LaunchDecodeAttention<__nv_bfloat16>(stream, a, smem);
    case ffi::DataType::F16: return LaunchDecodeAttention<__half>(stream, a, smem);
    default: return ffi::Error::InvalidArgument("decode_attention: unsupported qkv dtype");
  }
}

}  // namespace
}  // namespace jax_nf4

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4DecodeAttentionCuda, jax_nf4::DecodeAttentionCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<xla::ffi::ScratchAllocator>()
                                  .Arg<xla::ffi::AnyBuffer>()  // qkv
                                  .Arg<xla::ffi::AnyBuffer>()  // k_cache
                                  .Arg<xla::ffi::AnyBuffer>()  // v_cache
                                  .Arg<xla::ffi::AnyBuffer>()  // pos
                                  .Ret<xla::ffi::AnyBuffer>()  // out
                                  .Ret<xla::ffi::AnyBuffer>()  // k_cache
                                  .Ret<xla::ffi::AnyBuffer>()  // v_cache
                                  .Attr<float>("rope_theta"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
