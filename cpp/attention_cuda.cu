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
// This SIMT kernel serves float32, head dims other than 64 / 128 and more than 16 query heads
// per KV head; bf16 / f16 take the tensor-core split kernel below (DecodeAttentionMmaKernel).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "attention_ffi_shapes.h"
#include "attention_math.h"
#include "cuda_copy.cuh"
#include "cuda_dtypes.cuh"
#include "cuda_launch.cuh"
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
  int chunk;   // cache slots per CTA (SIMT kernel: a multiple of 32; split kernel: of 16)
  int chunks;  // ceil(max_len / chunk)
  int row;     // SIMT kernel: elements between staged cache rows, D + 16 bytes' worth
  int sum_warps;  // SIMT kernel: warps splitting the value sums (their sums fit where the
                  // key rows were)
  float theta;
};

// Shared memory of a CTA: the chunk's key and value rows [chunk][row] in T, the qkv rows of
// its KV head [G + 2][D] in T (padded to 16 bytes), the rotated queries q[G][D] (float32 of
// the dtype-rounded values), the scores / probabilities p[G][chunk], each head's max and sum,
// the rotary cos / sin of each dim pair [D / 2] (RopeRotation).
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
         sizeof(float) * size_t(groups * head_dim + groups * chunk + 2 * groups + head_dim);
}

// The rotary embedding of a KV head's G queries and new key: rows 0 .. G of its staged qkv
// rows xs [G + 2][D], each pair (i, i + D / 2) rotated by rope[i] (computed once per pair for
// all G + 1 rows) and rounded to T, as the model's rope returns them. Query g's pair goes to
// store_query(g, i, r1, r2); the key replaces its xs row and, in the CTA that owns the slot,
// the cache's slot row (k_slot), where the new value (row G + 1) goes too (v_slot).
template <typename T, typename StoreQuery>
__device__ __forceinline__ void RotateQueriesAndKey(T* xs, const RopeRotation* rope, int G,
                                                    int D, int threads, bool owns_slot,
                                                    T* k_slot, T* v_slot,
                                                    StoreQuery store_query) {
  const int half = D / 2;
  for (int e = threadIdx.x; e < (G + 1) * half; e += threads) {
    const int row = e / half, i = e % half;
    float y1, y2;
    Rotate(ToFloat(xs[row * D + i]), ToFloat(xs[row * D + i + half]), rope[i], &y1, &y2);
    const T r1 = FromFloat<T>(y1), r2 = FromFloat<T>(y2);
    if (row < G) {
      store_query(row, i, r1, r2);
    } else if (owns_slot) {
      xs[G * D + i] = k_slot[i] = r1;
      xs[G * D + i + half] = k_slot[i + half] = r2;
    }
  }
  if (owns_slot) {
    for (int d = threadIdx.x; d < D; d += threads) v_slot[d] = xs[(G + 1) * D + d];
  }
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
  RopeRotation* rope = reinterpret_cast<RopeRotation*>(stats + 2 * G);  // [D / 2]
  // The qkv rows go out first (their copies in flight while pos is read), then the chunk's
  // cache rows below: every copy in flight at once.
  const T* qkv = static_cast<const T*>(a.qkv) + (b * H + h) * (G + 2) * D;
  if constexpr (kCopy16) {
    for (int64_t i = threadIdx.x; i < (G + 2) * D / V; i += kAttnThreads)
      CopyAsync16(xs + i * V, qkv + i * V);
    CopyAsyncCommit();
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
    if constexpr (kCopy16) CopyAsyncWait<0>();
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
    CopyAsyncCommit();
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
  for (int i = threadIdx.x; i < int(D / 2); i += kAttnThreads)
    rope[i] = RopeAt(pos, i, int(D), a.theta);
  if constexpr (kCopy16) CopyAsyncWait<1>();
  __syncthreads();  // the qkv rows have landed, the rotations are in
  const bool owns_slot = slot < t1;
  RotateQueriesAndKey(xs, rope, int(G), int(D), kAttnThreads, owns_slot,
                      k_cache + slot * row_stride, v_cache + slot * row_stride,
                      [&](int g, int i, T r1, T r2) {
                        q[g * D + i] = ToFloat(r1);
                        q[g * D + i + D / 2] = ToFloat(r2);
                      });
  if constexpr (kCopy16) CopyAsyncWait<0>();
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

// The partials of one output element (weighted value sum acc, max m, exp sum l), combined in
// order: acc = sum_c e_c acc_c, l = sum_c e_c l_c, m = max_c m_c with e_c = exp(m_c - m); empty
// parts (m = -inf) weigh 0. The output is acc / l.
struct Partial {
  float acc, m, l;
};
template <typename Part>
__device__ __forceinline__ Partial CombineParts(int count, Part part) {
  float m = -INFINITY;
  for (int c = 0; c < count; ++c) m = fmaxf(m, part(c).m);
  float acc = 0.0f, l = 0.0f;
  for (int c = 0; c < count; ++c) {
    const Partial pc = part(c);
    const float e = pc.m == -INFINITY ? 0.0f : expf(pc.m - m);
    acc += e * pc.acc;
    l += e * pc.l;
  }
  return {acc, m, l};
}

// Combines the chunks' partials from FFI scratch ([chunks, B, H, G, D + 2]: weighted values,
// max, sum) of one (b, h, g) in chunk order, as CombineParts does: every chunk's statistics
// read at once into shared memory, the weights e_c computed a chunk per thread, then a thread
// per output dim sums over the chunks.
constexpr int kCombineThreads = 128;
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) CombineChunksKernel(AttentionArgs a) {
  extern __shared__ float stats[];  // [chunks]: max m_c, then the weight e_c; [chunks]: sum l_c
  float* sums = stats + a.chunks;
  const int64_t D = a.head_dim, G = a.groups, H = a.heads;
  const int64_t b = blockIdx.z, h = blockIdx.y, g = blockIdx.x;
  auto part = [&](int c) {
    return a.partial + (((int64_t(c) * a.batch + b) * H + h) * G + g) * (D + 2);
  };
  for (int c = threadIdx.x; c < a.chunks; c += kCombineThreads) {
    stats[c] = part(c)[D];
    sums[c] = part(c)[D + 1];
  }
  __syncthreads();
  float m = -INFINITY;
  for (int c = 0; c < a.chunks; ++c) m = fmaxf(m, stats[c]);
  __syncthreads();
  for (int c = threadIdx.x; c < a.chunks; c += kCombineThreads)
    stats[c] = stats[c] == -INFINITY ? 0.0f : expf(stats[c] - m);
  __syncthreads();
  float l = 0.0f;
  for (int c = 0; c < a.chunks; ++c) l += stats[c] * sums[c];
  for (int64_t d = threadIdx.x; d < D; d += kCombineThreads) {
    float acc = 0.0f;
#pragma unroll 16
    for (int c = 0; c < a.chunks; ++c) acc += stats[c] * part(c)[d];
    static_cast<T*>(a.out)[((b * H + h) * G + g) * D + d] = FromFloat<T>(acc / l);
  }
}
template <typename T>
cudaError_t LaunchCombineChunks(cudaStream_t stream, const AttentionArgs& a) {
  const size_t smem = sizeof(float) * 2 * size_t(a.chunks);
  cudaError_t err = cudaFuncSetAttribute(CombineChunksKernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  CombineChunksKernel<T><<<dim3(unsigned(a.groups), unsigned(a.heads), unsigned(a.batch)),
                           kCombineThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- tensor-core split kernel

// bf16 / f16, D = 64 or 128, G <= 16. The cache slots 0 .. slot of one (b, h) are split into
// `chunks` ranges of `chunk` slots, a CTA of W warps each. A warp takes the range's
// 16-slot tiles w, w + W, w + 2W, ..., streamed by cp.async through its own ring of S
// shared-memory stages (slots past the range zero-filled), and runs flash attention on the
// tensor cores (mma.m16n8k16, float32 accumulation): the scores Q K^T with the G rotated
// queries as the 16 rows of A (rows past G zero) against 8 slots at a time, an online softmax
// in float32 (running max and sum per query head), and O += P V. P enters the mma as two terms
// of the dtype, P = hi + lo (lo = P - hi rounded), so the weights keep ~16 significant bits and
// the output the float32-grade accuracy of the op's contract (one dtype-rounded P would lose
// it). The CTA then adds its warps' parts in warp order, and the chunks of the (b, h) are added
// in chunk order: over distributed shared memory where they form one thread-block cluster
// (sm_90, up to kMmaMaxCluster chunks), else by CombineChunksKernel from FFI scratch. The CTA
// whose range holds the slot writes the new key and value to the cache and uses them in place
// of the slot's old row. Sums run in a fixed order: bit-stable run to run.
constexpr int kMmaTile = 16;        // cache slots per warp step
// W warps per CTA and S ring stages per warp: caches of up to kMmaShortCache slots take 8
// warps of 2 stages (the CTA's fixed work spread wider; one CTA per SM), longer ones 4 warps of
// 3 stages (two CTAs per SM). H100 kernel µs, 8 / 4 warps: 70B (T = 80) 7.5 / 9.0, 8B at batch
// 8 (T = 144) 8.5 / 9.3, at batch 1 8.2 / 8.0; T = 4096 14.1 / 10.7 (bench/NOTES.md, session 19).
constexpr int kMmaShortCache = 1024;
__host__ __device__ constexpr int MmaWarps(bool short_cache) { return short_cache ? 8 : 4; }
__host__ __device__ constexpr int MmaStages(int warps) { return warps == 8 ? 2 : 3; }
constexpr int kMmaMaxGroups = 16;   // query heads per KV head: the mma's 16 rows
constexpr int kMmaMaxCluster = 8;   // CTAs per cluster (the portable maximum)
constexpr int kMmaMaxChunks = 64;   // chunks per (b, h) without a cluster
// Slots per chunk up to which the chunks form a cluster: beyond, more chunks and the combine
// kernel are faster (T = 4096, 8 KV heads: 8 chunks of 512 slots 24.7 µs, 32 of 128 and the
// combine kernel 17.4 µs; bench/NOTES.md, session 19).
constexpr int kMmaMaxClusterChunk = 256;

// Shared memory of the split kernel, in elements of T unless said: the warps' rings
// [W][S][K, V][16][D + 8] (rows padded by 16 bytes: the 8 rows an ldmatrix phase reads hit
// distinct banks), the rotated queries [16][D + 8] (rows G .. 15 unused), the qkv rows
// [G + 2][D] (16-byte padded), then float32: each warp's max and sum per head [W][G] twice, the
// CTA's [G] twice, the rotary cos / sin of each dim pair [D / 2] (RopeRotation). After the
// warps' loops the ring holds the warps' value sums [W][G][D] and the CTA's [G][D] (float32).
__host__ __device__ constexpr int MmaRow(int head_dim) { return head_dim + 8; }
__host__ __device__ constexpr size_t MmaRingBytes(int warps, int head_dim, size_t elem) {
  return size_t(warps) * MmaStages(warps) * 2 * kMmaTile * MmaRow(head_dim) * elem;
}
__host__ __device__ size_t MmaSharedBytes(int warps, int64_t groups, int head_dim, size_t elem) {
  return MmaRingBytes(warps, head_dim, elem) + size_t(kMmaTile) * MmaRow(head_dim) * elem +
         QkvSharedBytes(groups, head_dim, elem) +
         sizeof(float) * size_t(2 * warps * groups + 2 * groups + head_dim);
}
static_assert(MmaRingBytes(4, 64, 2) >= sizeof(float) * (4 + 1) * kMmaMaxGroups * 64 &&
                  MmaRingBytes(8, 64, 2) >= sizeof(float) * (8 + 1) * kMmaMaxGroups * 64,
              "the ring holds the value sums after the loops");

// Four 8x8 matrices of 16-bit elements; lane l gives the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void LoadMatrices(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row))
               : "memory");
}
__device__ __forceinline__ void LoadMatricesTransposed(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row))
               : "memory");
}

template <typename T, int D, int W, bool kCluster>
__global__ void __launch_bounds__(32 * W) DecodeAttentionMmaKernel(AttentionArgs a) {
  constexpr int R = MmaRow(D), KS = D / 16, NT = D / 8, S = MmaStages(W), kThreads = 32 * W;
  constexpr int kStage = 2 * kMmaTile * R;  // elements: the K tile, then the V tile
  extern __shared__ __align__(16) unsigned char shared[];
  const int G = int(a.groups);
  const int64_t H = a.heads, L = a.max_len;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int chunk = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  T* ring = reinterpret_cast<T*>(shared);
  T* qs = ring + W * S * kStage;  // [16][R]
  T* xs = qs + kMmaTile * R;                       // [G + 2][D]
  float* warp_max = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(xs) +
                                             QkvSharedBytes(G, D, sizeof(T)));  // [W][G]
  float* warp_sum = warp_max + W * G;                                   // [W][G]
  float* cta_max = warp_sum + W * G;                                    // [G]
  float* cta_sum = cta_max + G;                                                 // [G]
  float* warp_values = reinterpret_cast<float*>(shared);  // [W][G][D], after the loops
  float* cta_values = warp_values + W * G * D;    // [G][D]

  const T* qkv = static_cast<const T*>(a.qkv) + (b * H + h) * (G + 2) * D;
  for (int i = threadIdx.x; i < (G + 2) * D / 8; i += kThreads)
    CopyAsync16(xs + 8 * i, qkv + 8 * i);
  CopyAsyncCommit();
  const int32_t pos = *a.pos;
  const int64_t slot = DecodeSlot(pos, L);
  const int64_t t0 = int64_t(chunk) * a.chunk;
  const int n = int(t0 + a.chunk < slot + 1 ? a.chunk : (slot + 1 > t0 ? slot + 1 - t0 : 0));
  const int tiles = (n + kMmaTile - 1) / kMmaTile;
  const bool owns_slot = t0 <= slot && slot < t0 + a.chunk;
  const int64_t row_stride = H * D;  // between consecutive cache slots
  T* k_cache = static_cast<T*>(a.k_cache) + b * L * row_stride + h * D;
  T* v_cache = static_cast<T*>(a.v_cache) + b * L * row_stride + h * D;

  // The warp's k-th tile (range tile w + W k) into ring stage k % S; a group is committed
  // either way, so that every thread counts the same groups.
  auto stage = [&](int k) { return ring + (warp * S + k % S) * kStage; };
  auto issue = [&](int k) {
    const int tile = warp + W * k;
    if (tile < tiles) {
      T* ks = stage(k);
      T* vs = ks + kMmaTile * R;
      for (int c = lane; c < kMmaTile * D / 8; c += 32) {
        const int r = c / (D / 8), col = c % (D / 8) * 8;
        const int j = kMmaTile * tile + r;
        const int64_t offset = j < n ? (t0 + j) * row_stride + col : 0;
        CopyAsync16(ks + r * R + col, k_cache + offset, j < n);
        CopyAsync16(vs + r * R + col, v_cache + offset, j < n);
      }
    }
    CopyAsyncCommit();
  };
#pragma unroll
  for (int k = 0; k < S - 1; ++k) issue(k);

  // While the first tiles are in flight: the rotary embedding of the queries (rounded to T,
  // into the mma's A rows 0 .. G - 1) and of the new key (rounded to T, into its qkv
  // row), and the owner's cache write of the new key and value. Each pair's rotation is
  // computed once (rope[i], float32) for all G + 1 rows.
  constexpr int half = D / 2;
  RopeRotation* rope = reinterpret_cast<RopeRotation*>(cta_max + 2 * G);  // [D / 2]
  for (int i = threadIdx.x; i < half; i += kThreads) rope[i] = RopeAt(pos, i, D, a.theta);
  CopyAsyncWait<S - 1>();  // this thread's qkv copies
  __syncthreads();
  RotateQueriesAndKey(xs, rope, G, D, kThreads, owns_slot, k_cache + slot * row_stride,
                      v_cache + slot * row_stride, [&](int row, int i, T r1, T r2) {
                        qs[row * R + i] = r1;
                        qs[row * R + i + half] = r2;
                      });
  __syncthreads();

  // A fragments of the queries, for every k step; lane l addresses row l % 8 (+ 8 for
  // matrices 1 and 3) and column 8 (l / 16) of the step.
  const int frag_row = lane % 8 + 8 * (lane / 8 % 2), frag_col = 8 * (lane / 16);
  uint32_t qa[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    LoadMatrices(qa[kk], qs + frag_row * R + 16 * kk + frag_col);
    if (g >= G) qa[kk][0] = qa[kk][2] = 0;  // rows past G (never written in qs) are zero
    if (g + 8 >= G) qa[kk][1] = qa[kk][3] = 0;
  }

  // Online softmax over the warp's tiles: rows g and g + 8 of the mma (query heads) per lane.
  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.0f, 0.0f};
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  const float sqrt_d = sqrtf(float(D));
  for (int k = 0; warp + W * k < tiles; ++k) {
    issue(k + S - 1);
    CopyAsyncWait<S - 1>();
    __syncwarp();
    const int tile = warp + W * k;
    T* ks = stage(k);
    T* vs = ks + kMmaTile * R;
    const int64_t new_row = slot - t0 - kMmaTile * tile;
    if (owns_slot && new_row >= 0 && new_row < kMmaTile) {  // the new key and value
      for (int d = lane; d < D; d += 32) {
        ks[new_row * R + d] = xs[G * D + d];
        vs[new_row * R + d] = xs[(G + 1) * D + d];
      }
      __syncwarp();
    }
    // Scores of slots 8 j + (2t, 2t + 1) of the tile for heads g, g + 8: B fragments of two k
    // steps per ldmatrix (matrix m: slot rows, columns 8 m of the step pair).
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < KS; kk += 2) {
        uint32_t kb[4];
        LoadMatrices(kb, ks + (8 * j + lane % 8) * R + 16 * kk + 8 * (lane / 8));
        MmaType<T>::Mma(s[j], qa[kk], kb[0], kb[1]);
        MmaType<T>::Mma(s[j], qa[kk + 1], kb[2], kb[3]);
      }
    }
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool valid = kMmaTile * tile + 8 * j + 2 * t + (c & 1) < n;
        s[j][c] = valid ? s[j][c] / sqrt_d : -INFINITY;
        tile_max[c / 2] = fmaxf(tile_max[c / 2], s[j][c]);
      }
    float scale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // every tile has a valid slot: the new max is finite
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m = fmaxf(run_max[r], tile_max[r]);
      scale[r] = expf(run_max[r] - m);
      run_max[r] = m;
      run_sum[r] *= scale[r];
    }
    // P = exp(S - max) as the A fragment of P V (k = the tile's 16 slots), in two terms.
    uint32_t p_hi[4], p_lo[4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float p0 = expf(s[j][2 * r] - run_max[r]), p1 = expf(s[j][2 * r + 1] - run_max[r]);
        run_sum[r] += p0 + p1;
        const uint32_t hi = MmaType<T>::Pack(p0, p1);
        const float2 hf = MmaType<T>::Unpack(hi);
        p_hi[2 * j + r] = hi;
        p_lo[2 * j + r] = MmaType<T>::Pack(p0 - hf.x, p1 - hf.y);
      }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      o[j][0] *= scale[0];
      o[j][1] *= scale[0];
      o[j][2] *= scale[1];
      o[j][3] *= scale[1];
    }
    // O += P V: B fragments of two 8-wide n tiles of dims per transposed ldmatrix.
#pragma unroll
    for (int u = 0; u < D / 16; ++u) {
      uint32_t vb[4];
      LoadMatricesTransposed(vb, vs + frag_row * R + 16 * u + frag_col);
      MmaType<T>::Mma(o[2 * u], p_hi, vb[0], vb[1]);
      MmaType<T>::Mma(o[2 * u], p_lo, vb[0], vb[1]);
      MmaType<T>::Mma(o[2 * u + 1], p_hi, vb[2], vb[3]);
      MmaType<T>::Mma(o[2 * u + 1], p_lo, vb[2], vb[3]);
    }
    __syncwarp();  // every lane is done with the stage before it is refilled
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    run_sum[r] += __shfl_xor_sync(0xffffffffu, run_sum[r], 1);
    run_sum[r] += __shfl_xor_sync(0xffffffffu, run_sum[r], 2);
  }

  // The warps' parts (over the rings, now free), then the CTA's: their sum in warp order.
  __syncthreads();
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int row = g + 8 * (c / 2);
      if (row < G) warp_values[(warp * G + row) * D + 8 * j + 2 * t + (c & 1)] = o[j][c];
    }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (g + 8 * r < G) {
        warp_max[warp * G + g + 8 * r] = run_max[r];
        warp_sum[warp * G + g + 8 * r] = run_sum[r];
      }
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(a.out) + (b * H + h) * G * D;
  for (int e = threadIdx.x; e < G * D; e += kThreads) {
    const int row = e / D, d = e % D;
    const Partial r = CombineParts(W, [&](int w) {
      return Partial{warp_values[w * G * D + e], warp_max[w * G + row], warp_sum[w * G + row]};
    });
    if (a.chunks == 1) {
      out[e] = FromFloat<T>(r.acc / r.l);
    } else if (kCluster) {
      cta_values[e] = r.acc;
      if (d == 0) cta_max[row] = r.m, cta_sum[row] = r.l;
    } else {  // [chunk, b, h, row][D + 2] in FFI scratch
      float* partial =
          a.partial + (((int64_t(chunk) * a.batch + b) * H + h) * G + row) * (D + 2);
      partial[d] = r.acc;
      if (d == 0) partial[D] = r.m, partial[D + 1] = r.l;
    }
  }
  if constexpr (kCluster) {  // the chunks of this (b, h), in chunk order; a slice per CTA
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int e = chunk * kThreads + threadIdx.x; e < G * D; e += a.chunks * kThreads) {
      const int row = e / D;
      const Partial r = CombineParts(a.chunks, [&](int c) {
        return Partial{cluster.map_shared_rank(cta_values, c)[e],
                       cluster.map_shared_rank(cta_max, c)[row],
                       cluster.map_shared_rank(cta_sum, c)[row]};
      });
      out[e] = FromFloat<T>(r.acc / r.l);
    }
    cluster.sync();  // no CTA leaves while another reads its shared memory
#else
    __trap();  // launched as a cluster on sm_90 only
#endif
  }
}

// The most shared memory per SM for `kernel`, as the GEMV kernels around it in a decode step
// take (the SM then need not change its L1 / shared memory split between them), and `smem`
// bytes of it per CTA.
template <typename Kernel>
cudaError_t SetSharedMemory(Kernel kernel, size_t smem) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         cudaSharedmemCarveoutMaxShared);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  return err;
}

// The SIMT kernel, then with several chunks the combine kernel.
template <typename T>
cudaError_t LaunchDecodeAttentionSimt(cudaStream_t stream, const AttentionArgs& a, size_t smem) {
  constexpr int kVec = 16 / sizeof(T);
  auto kernel = a.head_dim % kVec == 0 ? DecodeAttentionKernel<T, kVec>
                                       : DecodeAttentionKernel<T, 1>;
  cudaError_t err = SetSharedMemory(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(a.chunks), unsigned(a.heads), unsigned(a.batch)), kAttnThreads, smem,
           stream>>>(a);
  err = cudaGetLastError();
  if (err == cudaSuccess && a.chunks > 1) err = LaunchCombineChunks<T>(stream, a);
  return err;
}

// The split kernel, its chunks of one (b, h) as one cluster or followed by the combine kernel.
template <typename T, int D, int W>
cudaError_t LaunchDecodeAttentionMma(cudaStream_t stream, const AttentionArgs& a, size_t smem,
                                     bool cluster) {
  auto kernel = cluster ? DecodeAttentionMmaKernel<T, D, W, true>
                        : DecodeAttentionMmaKernel<T, D, W, false>;
  cudaError_t err = SetSharedMemory(kernel, smem);
  if (err != cudaSuccess) return err;
  err = LaunchKernel(kernel, dim3(unsigned(a.chunks), unsigned(a.heads), unsigned(a.batch)),
                     dim3(32 * W), smem, stream, cluster ? unsigned(a.chunks) : 0u, a);
  if (err == cudaSuccess && a.chunks > 1 && !cluster) err = LaunchCombineChunks<T>(stream, a);
  return err;
}

// mma: the split kernel with `warps` warps per CTA (MmaWarps), else the SIMT kernel.
template <typename T>
cudaError_t LaunchDecodeAttention(cudaStream_t stream, const AttentionArgs& a, size_t smem,
                                  bool mma, int warps, bool cluster) {
  if (!mma) return LaunchDecodeAttentionSimt<T>(stream, a, smem);
  if constexpr (std::is_same_v<T, float>) {
    return cudaErrorInvalidValue;  // the split kernel is for 16-bit dtypes only
  } else {
    constexpr int kShort = MmaWarps(true), kLong = MmaWarps(false);
    const bool short_cache = warps == kShort;
    if (a.head_dim == 64)
      return short_cache ? LaunchDecodeAttentionMma<T, 64, kShort>(stream, a, smem, cluster)
                         : LaunchDecodeAttentionMma<T, 64, kLong>(stream, a, smem, cluster);
    return short_cache ? LaunchDecodeAttentionMma<T, 128, kShort>(stream, a, smem, cluster)
                       : LaunchDecodeAttentionMma<T, 128, kLong>(stream, a, smem, cluster);
  }
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
  int device = 0, optin = 0, sms = 0, major = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  const size_t elem = qkv.element_type() == ffi::DataType::F32 ? 4 : 2;
  const int64_t row = d.head_dim + int64_t(16 / elem);
  auto round32 = [](int64_t v) { return (v + 31) / 32 * 32; };
  // bf16 / f16 with D = 64 or 128 and G <= 16: the split kernel, the cache in about two CTAs
  // per SM in all, a tile per warp at least (chunks of >= 16 W slots), as one cluster per
  // (b, h) on sm_90 where its chunks are short. Else the SIMT kernel: slots per CTA as many as its
  // shared memory budget holds (a multiple of 32, at most kAttnMaxChunk, no more than the cache
  // has).
  const int warps = MmaWarps(d.max_len <= kMmaShortCache);
  const bool mma = elem == 2 && (d.head_dim == 64 || d.head_dim == 128) &&
                   d.groups <= kMmaMaxGroups &&
                   MmaSharedBytes(warps, d.groups, int(d.head_dim), elem) <= size_t(optin);
  int64_t chunk = 0;
  size_t smem = 0;
  bool cluster = false;
  if (mma) {
    const int64_t want = std::clamp<int64_t>(
        std::min<int64_t>(2 * int64_t(sms) / (d.batch * d.kv_heads),
                          (d.max_len + warps * kMmaTile - 1) / (warps * kMmaTile)),
        1, kMmaMaxChunks);
    auto slots_per_chunk = [&](int64_t chunks) {
      return ((d.max_len + chunks - 1) / chunks + kMmaTile - 1) / kMmaTile * kMmaTile;
    };
    const int64_t cluster_chunk = slots_per_chunk(std::min<int64_t>(want, kMmaMaxCluster));
    cluster = major >= 9 && cluster_chunk <= kMmaMaxClusterChunk && cluster_chunk < d.max_len;
    chunk = cluster ? cluster_chunk : slots_per_chunk(want);
    smem = MmaSharedBytes(warps, d.groups, int(d.head_dim), elem);
  } else {
    const size_t budget = optin < kAttnSharedBudget ? size_t(optin) : size_t(kAttnSharedBudget);
    chunk = std::min<int64_t>(kAttnMaxChunk, round32(d.max_len));
    while (chunk > 32 && AttentionSharedBytes(d.groups, d.head_dim, chunk, row, elem) > budget)
      chunk -= 32;
    smem = AttentionSharedBytes(d.groups, d.head_dim, chunk, row, elem);
    if (smem > budget)
      return ffi::Error::InvalidArgument(
          "decode_attention: " + std::to_string(d.groups) + " query heads per KV head of dim " +
          std::to_string(d.head_dim) + " leave no room for " + std::to_string(chunk) +
          " cache slots in " + std::to_string(budget) + " bytes of shared memory");
  }
  const int chunks = int((d.max_len + chunk - 1) / chunk);
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
  const int64_t sum_warps = mma ? 0 : std::clamp<int64_t>(
      int64_t(KeyRegionBytes(d.groups, d.head_dim, chunk, row, elem)) /
          (d.groups * d.head_dim * int64_t(sizeof(float))),
      1, kAttnThreads / 32);
  AttentionArgs a{qkv.untyped_data(), k_out->untyped_data(), v_out->untyped_data(),
                  static_cast<const int32_t*>(pos.untyped_data()), out->untyped_data(), nullptr,
                  d.batch, d.kv_heads, d.groups, d.head_dim, d.max_len, int(chunk), chunks,
                  int(row), int(sum_warps), rope_theta};
  if (chunks > 1 && !cluster) {
    const size_t bytes = sizeof(float) * size_t(chunks) *
                         size_t(d.batch * d.kv_heads * d.groups) * size_t(d.head_dim + 2);
    auto buffer = scratch.Allocate(bytes, 16);
    if (!buffer.has_value())
      return ffi::Error::Internal("decode_attention: could not allocate " +
                                  std::to_string(bytes) + " bytes of scratch for chunk partials");
    a.partial = static_cast<float*>(buffer.value());
  }
  const cudaError_t err = DispatchActivation(qkv.element_type(), [&](auto t) {
    return LaunchDecodeAttention<decltype(t)>(stream, a, smem, mma, warps, cluster);
  });
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("decode_attention: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
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
