// Device code shared by the NF4 kernel files (gemv_cuda.cu, tiled_cuda.cu, wgmma_cuda.cu,
// quantize_cuda.cu): vector loads, the codebook in constant and shared memory, the 16-row-tile
// decode's pair table, the staged double-quant scale decode, the split-K sum and its planner.
// In an unnamed namespace: each kernel file has its own copy (the constant codebook too).
//
// Kernels read the packed weights with 16-byte streaming loads when the block size allows
// (block_size % 16 == 0), else with a byte-wise path; the codebook sits in shared memory
// replicated once per bank, so the 32 lanes of a warp never conflict. Reductions run in a fixed
// order: results are bit-stable run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_dtypes.cuh"
#include "nf4_math.h"
#include "nf4_scales.h"

namespace jax_nf4 {
namespace {

constexpr int kThreads = 256;  // 8 warps per CTA
constexpr int kWarps = kThreads / 32;

// V consecutive elements of type T (V * sizeof(T) bytes, aligned to that size when V > 1).
template <typename T, int V>
struct alignas(V * sizeof(T) >= 16 ? 16 : V * sizeof(T)) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> LoadVec(const T* p) {
  Vec<T, V> out;
  if constexpr (V * sizeof(T) % 16 == 0) {
    const uint4* src = reinterpret_cast<const uint4*>(p);
    uint4* dst = reinterpret_cast<uint4*>(&out);
#pragma unroll
    for (int i = 0; i < int(V * sizeof(T) / 16); ++i) dst[i] = __ldg(src + i);
  } else if constexpr (V * sizeof(T) == 8) {
    *reinterpret_cast<uint2*>(&out) = __ldg(reinterpret_cast<const uint2*>(p));
  } else if constexpr (V * sizeof(T) == 4 && V > 1) {
    *reinterpret_cast<uint32_t*>(&out) = __ldg(reinterpret_cast<const unsigned int*>(p));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out.v[i] = p[i];
  }
  return out;
}

template <typename T, int V>
__device__ __forceinline__ void StoreVec(T* p, const Vec<T, V>& val) {
  if constexpr (V * sizeof(T) % 16 == 0) {
    uint4* dst = reinterpret_cast<uint4*>(p);
    const uint4* src = reinterpret_cast<const uint4*>(&val);
#pragma unroll
    for (int i = 0; i < int(V * sizeof(T) / 16); ++i) dst[i] = src[i];
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = val.v[i];
  }
}

// V packed weight bytes; 4, 8 or 16 of them come in one streaming (evict-first) load.
template <int V>
__device__ __forceinline__ Vec<uint8_t, V> LoadPacked(const uint8_t* p) {
  Vec<uint8_t, V> out;
  if constexpr (V == 4 || V == 8 || V == 16) {
    using Word = std::conditional_t<V == 16, uint4, std::conditional_t<V == 8, uint2, unsigned>>;
    *reinterpret_cast<Word*>(&out) = __ldcs(reinterpret_cast<const Word*>(p));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out.v[i] = p[i];
  }
  return out;
}

// Bytes 4j..4j+3 of a chunk as one word (the whole chunk when it is narrower than a word).
template <int V>
__device__ __forceinline__ uint32_t WordAt(const Vec<uint8_t, V>& w, int j) {
  if constexpr (V >= 4) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(&w);
    uint32_t out = words[0];
#pragma unroll
    for (int i = 1; i < V / 4; ++i) out = (j == i) ? words[i] : out;  // selects, no local memory
    return out;
  } else {
    return w.v[0];
  }
}

// The codebook in constant memory, for tables built from a thread-dependent code.
__constant__ float kDeviceCodebook[16] = {
    CodeValue(0), CodeValue(1), CodeValue(2),  CodeValue(3),  CodeValue(4),  CodeValue(5),
    CodeValue(6), CodeValue(7), CodeValue(8),  CodeValue(9),  CodeValue(10), CodeValue(11),
    CodeValue(12), CodeValue(13), CodeValue(14), CodeValue(15)};

// The codebook replicated across the 32 banks: entry `code` for lane l is at code * 32 + l.
struct SharedCodebook {
  float value[16 * 32];
  __device__ __forceinline__ void Fill() {
    for (int i = threadIdx.x; i < 16 * 32; i += blockDim.x) value[i] = kDeviceCodebook[i >> 5];
  }
  __device__ __forceinline__ float operator()(int code, int lane) const {
    return value[code * 32 + lane];
  }
};

// Grid of a grid-stride kernel over work_items.
inline unsigned GridFor(int64_t work_items, int64_t items_per_cta) {
  const int64_t ctas = (work_items + items_per_cta - 1) / items_per_cta;
  return unsigned(ctas < 65536 ? ctas : 65536);  // grid-stride loops cover the rest
}

// The 16-row-tile decode, shared by the 16-row-tile GEMV and the tiled kernel: a table of the
// 256 (low-nibble value, high-nibble value) pairs in the activation dtype, one copy per bank
// (entry e for lane l at word 32e + l, 32 KB), and the A fragment of one mma step from a word
// of 4 code bytes (two k of row pair g: low nibbles are row 2g, high nibbles row 2g + 1).
constexpr int kPairTableBytes = 256 * 8 * 16;
template <typename T>
struct PairTable {
  uint32_t lane_entry0;  // shared address of this lane's copy of entry 0

  __device__ explicit PairTable(uint4* table)
      : lane_entry0(static_cast<uint32_t>(__cvta_generic_to_shared(table)) +
                    4 * (threadIdx.x % 32)) {}
  static __device__ void Fill(uint4* table) {
    for (int e = threadIdx.x; e < 256; e += blockDim.x) {
      const uint32_t v = MmaType<T>::Pack(kDeviceCodebook[e & 15], kDeviceCodebook[e >> 4]);
#pragma unroll
      for (int c = 0; c < 8; ++c) table[e * 8 + c] = make_uint4(v, v, v, v);
    }
  }
  __device__ uint32_t operator()(uint32_t entry) const {  // a shift-add and one LDS
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(lane_entry0 + (entry << 7)));
    return v;
  }
  // Table indices: low nibbles of bytes (0, 1) and (2, 3) for row 2g, high nibbles for row
  // 2g + 1, each pair merged into one byte.
  __device__ void Fragment(uint32_t word, uint32_t (&frag)[4]) const {
    const uint32_t lo = word & 0x0f0f0f0fu, hi = (word >> 4) & 0x0f0f0f0fu;
    const uint32_t lo_pairs = lo | (lo >> 4), hi_pairs = hi | (hi >> 4);
    frag[0] = (*this)(__byte_perm(lo_pairs, 0, 0x4440));
    frag[1] = (*this)(__byte_perm(hi_pairs, 0, 0x4440));
    frag[2] = (*this)(__byte_perm(lo_pairs, 0, 0x4442));
    frag[3] = (*this)(__byte_perm(hi_pairs, 0, 0x4442));
  }
};

// The float32 scale of block `blk` of a row from its raw read: plain scales as read; double-quant
// ones from their code's entry in the 256-entry table staged at shared address `table` (a
// 32-bit LDS), times the row's nested scale `nested` where all its blocks lie in one nested
// group (row_nested), else the block's nested scale read here.
template <typename Row>
__device__ __forceinline__ float DecodeStagedScale(const Row& row, typename Row::Raw raw, int blk,
                                                   uint32_t table, bool row_nested,
                                                   float nested) {
  if constexpr (std::is_same_v<Row, DoubleQuantScales::Row>) {
    float entry;
    asm("ld.shared.f32 %0, [%1];" : "=f"(entry) : "r"(table + 4 * raw));
    return row_nested ? DecodeDoubleQuantScale(entry, nested, row.offset)
                      : row.DecodeWith(entry, blk);
  } else {
    return row.Decode(raw, blk);
  }
}

template <typename Scales>
constexpr bool kIsDoubleQuant = std::is_same_v<Scales, DoubleQuantScales>;

// out = the sum of the k_splits partial products, added in split order.
template <typename T>
__global__ void __launch_bounds__(kThreads) SumKSplitsKernel(const float* partial, T* out,
                                                             int64_t count, int splits) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[s * count + i];
    out[i] = FromFloat<T>(sum);
  }
}

// out (count elements of T) = the sum of `splits` float32 partial products.
template <typename T>
cudaError_t LaunchSumKSplits(const float* partial, void* out, int64_t count, int splits,
                             cudaStream_t stream) {
  SumKSplitsKernel<T><<<GridFor(count, kThreads), kThreads, 0, stream>>>(
      partial, static_cast<T*>(out), count, splits);
  return cudaGetLastError();
}

// The K split of the tiled and wgmma kernels: `splits` CTAs share a tile's `steps` 64-element
// spans, `per` each (rounded up to a multiple of `granule`; at least 8 unless unsplit), and the
// choice minimizes rounds x (per + ~4 spans of fill, drain and store + partial_cost where split),
// rounds = ceil(ctas x splits / slots), splits <= max_splits. (A split count whose last split
// would be empty has the same `per` as a smaller one with fewer CTAs, which the search meets
// first.)
struct KSplit {
  int splits = 1;
  int64_t per = 0, cost = 0;
};

inline KSplit ChooseKSplit(int64_t ctas, int64_t slots, int64_t steps, int64_t granule,
                    int64_t partial_cost, int max_splits) {
  KSplit best;
  for (int splits = 1; splits <= max_splits; ++splits) {
    const int64_t per = (steps + splits * granule - 1) / (splits * granule) * granule;
    if (splits > 1 && per < 8) break;  // per only shrinks with more splits
    const int64_t cost =
        (ctas * splits + slots - 1) / slots * (per + 4 + (splits > 1 ? partial_cost : 0));
    if (splits == 1 || cost < best.cost) best = {splits, per, cost};
  }
  return best;
}

}  // namespace
}  // namespace jax_nf4
