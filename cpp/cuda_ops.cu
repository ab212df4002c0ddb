// CUDA FFI handlers for the NF4 ops: quantize, dequantize and the fused dequant + matmul (GEMV
// kernels up to kMaxFusedRows activation rows, the tiled tensor-core kernel above, and on sm_90
// the wgmma kernel above kWgMinRows; the Python lowering sends large M to dequantize + an XLA
// dot instead).
//
// Operands carry a leading group dim G (see nf4_ffi_shapes.h). Kernels read the packed weights
// with 16-byte streaming loads when the block size allows (block_size % 16 == 0), else with a
// byte-wise path; the codebook sits in shared memory replicated once per bank, so the 32 lanes
// of a warp never conflict. Reductions run in a fixed order: results are bit-stable run to run.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>

#include <cooperative_groups.h>

#include "cuda_copy.cuh"
#include "cuda_dtypes.cuh"
#include "cuda_launch.cuh"
#include "nf4_ffi_shapes.h"
#include "nf4_math.h"
#include "nf4_scales.h"
#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {
namespace {

constexpr int kThreads = 256;  // 8 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kMaxFusedRows = 8;

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
unsigned GridFor(int64_t work_items, int64_t items_per_cta) {
  const int64_t ctas = (work_items + items_per_cta - 1) / items_per_cta;
  return unsigned(ctas < 65536 ? ctas : 65536);  // grid-stride loops cover the rest
}

// ---------------------------------------------------------------- fused GEMV

template <typename Scales>
struct GemvArgs {
  const void* x;         // [G, m_total, K]; this launch reads rows [m0, m0 + M)
  const uint8_t* packed; // [G, N/2, K]
  Scales scales;         // block scales (nf4_scales.h)
  void* out;             // [G, m_total, N]
  int64_t m_total, m0;
  int64_t pairs, cols, block_size;
  int64_t ctas_per_group;
  int64_t groups;       // byte-pair kernel: G (its grid is persistent)
  int splits;           // warps sharing one row group along K
  int steps_per_split;  // byte-pair kernel: 64-element spans per split (a multiple of its unroll)
  int block_shift;  // log2(block_size) when it is a power of two, else -1

  // Scale block of contraction index k (a shift in the common power-of-two case).
  __device__ __forceinline__ int64_t Block(int64_t k) const {
    return block_shift >= 0 ? (k >> block_shift) : k / block_size;
  }
};

int Log2IfPowerOfTwo(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int shift = 0;
  while ((int64_t(1) << shift) < v) ++shift;
  return shift;
}

// One warp group (`splits` warps) computes R row pairs (2R outputs) for M activation rows;
// lane l of split s reads the V-byte chunks s*32 + l, s*32 + l + 32*splits, ... along K.
template <typename T, int M, int R, int V, typename Scales>
__global__ void __launch_bounds__(kThreads, 2) GemvKernel(GemvArgs<Scales> a) {
  __shared__ SharedCodebook codebook;
  __shared__ float partial[kWarps][2 * R * M];
  codebook.Fill();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int splits = a.splits;
  const int64_t g = blockIdx.x / a.ctas_per_group;
  const int64_t cta = blockIdx.x % a.ctas_per_group;
  const int64_t pair0 = (cta * (kWarps / splits) + warp / splits) * R;
  const int split = warp % splits;
  const int64_t K = a.cols, N = 2 * a.pairs, blocks = K / a.block_size;

  const T* x = static_cast<const T*>(a.x) + (g * a.m_total + a.m0) * K;
  const uint8_t* packed = a.packed + g * a.pairs * K;

  float acc[R][2][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][0][m] = acc[r][1][m] = 0.0f;

  const int64_t chunks = K / V;
  for (int64_t c = int64_t(split) * 32 + lane; c < chunks; c += 32 * splits) {
    const int64_t k0 = c * V;
    Vec<uint8_t, V> w[R];
    float scale[R][2];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t pair = pair0 + r;
      if (pair < a.pairs) {
        w[r] = LoadPacked<V>(packed + pair * K + k0);
        const int64_t b = a.Block(k0);  // V divides block_size: one scale per chunk
        scale[r][0] = a.scales.RowOf(g, 2 * pair, N, blocks)(b);
        scale[r][1] = a.scales.RowOf(g, 2 * pair + 1, N, blocks)(b);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) w[r].v[i] = 0;
        scale[r][0] = scale[r][1] = 0.0f;
      }
    }
    float part[R][2][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) part[r][0][m] = part[r][1][m] = 0.0f;

    // The chunk word by word (4 bytes = 8 codes per row pair): a rolled loop keeps the
    // compiler from hoisting every codebook read of the chunk into registers.
    constexpr int kWordBytes = V < 4 ? V : 4;
#pragma unroll 1
    for (int word = 0; word < V / kWordBytes; ++word) {
      uint32_t bytes[R];
#pragma unroll
      for (int r = 0; r < R; ++r) bytes[r] = WordAt(w[r], word);
      Vec<T, kWordBytes> xv[M];
#pragma unroll
      for (int m = 0; m < M; ++m)
        xv[m] = LoadVec<T, kWordBytes>(x + m * K + k0 + word * kWordBytes);
#pragma unroll
      for (int i = 0; i < kWordBytes; ++i) {
        float wv[R][2];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t byte = bytes[r] >> (8 * i);
          wv[r][0] = codebook(EvenRowCode(byte), lane);
          wv[r][1] = codebook(OddRowCode(byte), lane);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float xf = ToFloat(xv[m].v[i]);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            part[r][0][m] = fmaf(wv[r][0], xf, part[r][0][m]);
            part[r][1][m] = fmaf(wv[r][1], xf, part[r][1][m]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        acc[r][0][m] = fmaf(scale[r][0], part[r][0][m], acc[r][0][m]);
        acc[r][1][m] = fmaf(scale[r][1], part[r][1][m], acc[r][1][m]);
      }
  }

  // Butterfly reduction across the warp (every lane ends with the warp's totals).
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float v = acc[r][h][m];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        acc[r][h][m] = v;
      }

  // Lane j of each warp holds output j = (r * 2 + h) * M + m; splits are summed in order.
  constexpr int kOut = 2 * R * M;
  float mine = 0.0f;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (lane == (r * 2 + h) * M + m) mine = acc[r][h][m];
  if (splits > 1) {
    if (lane < kOut) partial[warp][lane] = mine;
    __syncthreads();
    if (split != 0) return;
    mine = 0.0f;
    for (int s = 0; s < splits; ++s) mine += (lane < kOut) ? partial[warp + s][lane] : 0.0f;
  }
  if (lane < kOut) {
    const int r = lane / (2 * M), h = (lane / M) % 2, m = lane % M;
    const int64_t n = 2 * (pair0 + r) + h;
    if (pair0 + r < a.pairs) {
      T* out = static_cast<T*>(a.out) + (g * a.m_total + a.m0 + m) * N + n;
      *out = FromFloat<T>(mine);
    }
  }
}

template <typename T, int M, int V, typename Scales>
cudaError_t LaunchGemvRows(GemvArgs<Scales> a, int64_t groups, cudaStream_t stream) {
  constexpr int R = M <= 2 ? 4 : 2;  // row pairs per warp group: more bytes in flight at small M
  const int64_t row_groups = (a.pairs + R - 1) / R;
  const int64_t chunks = a.cols / V;
  // Split K across warps while the grid is small and each lane keeps >= 2 chunks.
  int splits = 1;
  while (splits < kWarps && row_groups * splits < 8192 && chunks >= int64_t(64) * splits)
    splits *= 2;
  a.splits = splits;
  a.ctas_per_group = (row_groups + kWarps / splits - 1) / (kWarps / splits);
  GemvKernel<T, M, R, V, Scales>
      <<<dim3(unsigned(a.ctas_per_group * groups)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int V, typename Scales>
cudaError_t LaunchGemv(GemvArgs<Scales> a, int64_t groups, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  for (int64_t m0 = 0; m0 < a.m_total && err == cudaSuccess; m0 += kMaxFusedRows) {
    a.m0 = m0;
    switch (a.m_total - m0 < kMaxFusedRows ? a.m_total - m0 : kMaxFusedRows) {
      case 1: err = LaunchGemvRows<T, 1, V, Scales>(a, groups, stream); break;
      case 2: err = LaunchGemvRows<T, 2, V, Scales>(a, groups, stream); break;
      case 3: err = LaunchGemvRows<T, 3, V, Scales>(a, groups, stream); break;
      case 4: err = LaunchGemvRows<T, 4, V, Scales>(a, groups, stream); break;
      case 5: err = LaunchGemvRows<T, 5, V, Scales>(a, groups, stream); break;
      case 6: err = LaunchGemvRows<T, 6, V, Scales>(a, groups, stream); break;
      case 7: err = LaunchGemvRows<T, 7, V, Scales>(a, groups, stream); break;
      default: err = LaunchGemvRows<T, 8, V, Scales>(a, groups, stream); break;
    }
  }
  return err;
}

// ---------------------------------------------------------------- tensor-core GEMV (16-bit)

// bf16 / f16 activations with block_size % 64 == 0 run on the tensor cores (mma.m16n8k16,
// float32 accumulation) for up to 8 activation rows per launch: the M <= 8 path of GPUs whose
// CTAs cannot have the byte-pair kernel's shared memory (sm_86, sm_89), and M > 8 there, 8 rows
// at a time, when the tiled kernel's does not fit either. One warp owns 8 row pairs (16 output
// rows); the rows of the mma tile are permuted so that mma rows g and g + 8 are weight rows 2g
// and 2g + 1, i.e. the two nibbles of one packed byte. The contraction index is permuted too:
// lane (g, t) of a quad loads the 16 bytes k0 + 16t .. k0 + 16t + 15 of row pair g, and its
// mma step s covers bytes 4s .. 4s + 3, so every lane decodes only the bytes it loaded and reads
// activations at the same k. Codes decode two at a time through a 256-entry table of 16-bit
// value pairs (replicated once per bank). The codebook enters the product in the activation
// dtype; the block scale multiplies the float32 partial sum of each 64-element span. (The mma
// itself: MmaType in cuda_dtypes.cuh.)

// Fixed-order sum over the `splits` warps that share a tile along K (warps w .. w + splits - 1,
// split 0 first): every warp stores its mma accumulators; after the barrier split 0 holds the
// totals (bit-stable run to run: no atomics).
template <int NT>
__device__ __forceinline__ void SumSplits(float (&acc)[NT][4], float (*partial)[32][4 * NT],
                                          int warp, int lane, int split, int splits) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) partial[warp][lane][4 * j + c] = acc[j][c];
  __syncthreads();
  if (split != 0) return;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float sum = 0.0f;
      for (int sp = 0; sp < splits; ++sp) sum += partial[warp + sp][lane][4 * j + c];
      acc[j][c] = sum;
    }
}

constexpr int kTcSpan = 64;    // contraction elements per quad per step
constexpr int kTcUnroll = 4;   // steps whose loads are issued together

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

template <typename T, typename Scales>
__global__ void __launch_bounds__(kThreads, 2) GemvTensorCoreKernel(GemvArgs<Scales> a) {
  __shared__ uint4 pair_table_storage[kPairTableBytes / 16];
  __shared__ float partial[kWarps][32][4];
  PairTable<T>::Fill(pair_table_storage);
  __syncthreads();
  const PairTable<T> pair_table(pair_table_storage);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int splits = a.splits;
  const int64_t grp = blockIdx.x / a.ctas_per_group;
  const int64_t cta = blockIdx.x % a.ctas_per_group;
  const int64_t pair0 = (cta * (kWarps / splits) + warp / splits) * 8;
  const int split = warp % splits;
  const int64_t K = a.cols, N = 2 * a.pairs, blocks = K / a.block_size;
  const int64_t pair = pair0 + g;
  const bool pair_ok = pair < a.pairs;
  const int rows = int(a.m_total - a.m0 < 8 ? a.m_total - a.m0 : 8);

  const uint8_t* wrow = a.packed + (grp * a.pairs + (pair_ok ? pair : 0)) * K + 16 * t;
  const auto scale_even = a.scales.RowOf(grp, 2 * (pair_ok ? pair : 0), N, blocks);
  const auto scale_odd = a.scales.RowOf(grp, 2 * (pair_ok ? pair : 0) + 1, N, blocks);
  const T* x = static_cast<const T*>(a.x) + (grp * a.m_total + a.m0) * K + 16 * t;

  float acc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};

  // Steps split, split + splits, ... of this warp, kTcUnroll at a time; the weights and scales
  // of the next group load while the current group computes (register double buffering).
  // Offsets within a row are 32-bit; the scale block of a step is a shift (power-of-two
  // block sizes only take this path).
  const int steps = int(K / kTcSpan);
  const int stride = splits * kTcUnroll;
  const int step_shift = a.block_shift - 6;
  uint4 w[kTcUnroll], w_next[kTcUnroll];
  float se[kTcUnroll], so[kTcUnroll], se_next[kTcUnroll], so_next[kTcUnroll];
  auto load_group = [&](int s0, uint4 (&wg)[kTcUnroll], float (&eg)[kTcUnroll],
                        float (&og)[kTcUnroll]) {
#pragma unroll
    for (int u = 0; u < kTcUnroll; ++u) {
      const int step = s0 + u * splits;
      const bool ok = pair_ok && step < steps;
      wg[u] = ok ? __ldcs(reinterpret_cast<const uint4*>(wrow) + step * (kTcSpan / 16))
                 : make_uint4(0, 0, 0, 0);
      eg[u] = ok ? scale_even(step >> step_shift) : 0.0f;
      og[u] = ok ? scale_odd(step >> step_shift) : 0.0f;
    }
  };
  load_group(split, w, se, so);
  for (int s0 = split; s0 < steps; s0 += stride) {
    load_group(s0 + stride, w_next, se_next, so_next);
    // Activation fragments of row m = g (rows past M read as zero), the whole group's up front
    // so that their latency overlaps.
    uint4 xv[kTcUnroll][2];
#pragma unroll
    for (int u = 0; u < kTcUnroll; ++u) {
      const int step = s0 + u * splits;
      if (g < rows && step < steps) {
        const uint4* src = reinterpret_cast<const uint4*>(x + g * K) + step * (kTcSpan / 8);
        xv[u][0] = __ldg(src);
        xv[u][1] = __ldg(src + 1);
      } else {
        xv[u][0] = xv[u][1] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kTcUnroll; ++u) {
      if (s0 + u * splits >= steps) break;
      float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const uint32_t words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        uint32_t frag[4];
        pair_table.Fragment(words[s], frag);
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[u][0]);
        MmaType<T>::Mma(part, frag, xw[2 * s], xw[2 * s + 1]);
      }
      acc[0][0] = fmaf(se[u], part[0], acc[0][0]);
      acc[0][1] = fmaf(se[u], part[1], acc[0][1]);
      acc[0][2] = fmaf(so[u], part[2], acc[0][2]);
      acc[0][3] = fmaf(so[u], part[3], acc[0][3]);
    }
#pragma unroll
    for (int u = 0; u < kTcUnroll; ++u) {
      w[u] = w_next[u];
      se[u] = se_next[u];
      so[u] = so_next[u];
    }
  }

  if (splits > 1) {
    SumSplits<1>(acc, partial, warp, lane, split, splits);
    if (split != 0) return;
  }
  if (!pair_ok) return;
  T* out = static_cast<T*>(a.out) + (grp * a.m_total + a.m0) * N + 2 * pair;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int m = 2 * t + (c & 1);
    if (m < rows) out[m * N + (c >> 1)] = FromFloat<T>(acc[0][c]);
  }
}

template <typename T, typename Scales>
cudaError_t LaunchGemvTensorCoreRows(GemvArgs<Scales> a, int64_t groups, cudaStream_t stream) {
  const int64_t row_groups = (a.pairs + 7) / 8;
  const int64_t steps = a.cols / kTcSpan;
  // Split K across warps until the grid has many waves, keeping >= 2 groups per warp.
  int splits = 1;
  while (splits < kWarps && row_groups * splits < 16384 &&
         steps >= int64_t(2) * kTcUnroll * splits)
    splits *= 2;
  a.splits = splits;
  a.ctas_per_group = (row_groups + kWarps / splits - 1) / (kWarps / splits);
  GemvTensorCoreKernel<T, Scales>
      <<<dim3(unsigned(a.ctas_per_group * groups)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- byte-pair tensor-core GEMV

// Fused GEMV for bf16 / f16 activations, power-of-two block_size >= 64, up to 4 * NT rows:
// the decode path (M <= 8). The mma contraction index k' = 2j + h runs over (k, which row of
// the pair), so a packed byte (even-row code, odd-row code at one k) decodes with ONE table
// lookup into exactly the A register (even value, odd value) of mma row `pair`; the activation
// operand B[(h, k)][(h', m)] = [h == h'] x[m][k] routes each half to its own output column
// n = 2m + h', and C[pair][2m + h] = out[m][2 pair + h]. A warp owns 16 row pairs (mma rows g and
// g + 8 are pairs p0 + g and p0 + g + 8). Lane (g, t) loads the 16 bytes k0 + 16t .. k0 + 16t + 15
// of both its pairs, and its mma step s (8 per 64-element span) uses bytes 2s (j = t) and
// 2s + 1 (j = t + 4), so each lane decodes only what it loaded. The lookup address comes from
// one byte_perm: the code byte is the entry index (bits 8-15) and the lane picks its bank (bits
// 2-6) in a table of 256 entries x 32 lanes at a 256-byte stride placed at a 64 KB-aligned
// shared address, so the byte_perm's result IS the address (one PRMT and one LDS per byte).
// The table is 64 KB of a dynamic allocation (aligned inside it at run time), so one 16-warp
// CTA per SM; the grid is persistent (one CTA per SM looping over work units: 16 / splits
// tiles of 16 row pairs, K split over `splits` warps each), and a warp's weight loads run
// through a ring of registers that continues across its units, so the next unit's loads are
// in flight during the current unit's split-K reduction and the stream does not drain.
constexpr int kBpSpan = 64;                   // contraction elements per quad per step
constexpr int kBpWarps = 16;                  // warps per CTA
// Dynamic shared memory: up to 64 KB of alignment padding, the 64 KB table, the double-quant
// scale table (1 KB) and two buffers of split-K partial sums (units alternate between them).
template <int NT>
constexpr int kBpSharedBytes = 65536 + 65536 + 1024 + 2 * kBpWarps * 32 * 4 * NT * 4;

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

// How the byte-pair kernel reads the scales: one read per span (any scales); plain scales of
// 64-element blocks with an even count per row in aligned pairs (see `load`); double-quant
// scales with one group (no vmap batch) through a copy of their 256-entry table in shared
// memory, made once per CTA (read by LDS with a 32-bit address, see `compute`); the same where
// a row's blocks lie in one 256-block nested group (K / block_size divides 256), its nested
// scale read once per unit.
enum class BpScaleRead { kPerSpan, kPairs, kSharedTable, kSharedTableRowNested };

// The weights' streaming load (evict-first) with L2's 128-byte prefetch-size hint: L2 fetches the
// aligned 128 bytes holding the 64 a quad reads of a byte row, so an even span brings the next
// (0.2 - 1.4% faster on every benchmark shape, H100; the 256-byte hint is 2 - 10% slower).
__device__ __forceinline__ uint4 LoadWeights(const uint4* p) {
  uint4 v;
  asm("ld.global.cs.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// U: spans whose loads are issued together; R: load groups in the register ring.
template <typename T, int NT, int U, int R, typename Scales, BpScaleRead kScaleRead>
__global__ void __launch_bounds__(32 * kBpWarps, 1) GemvBytePairKernel(GemvArgs<Scales> a) {
  constexpr int W = kBpWarps;
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  const uint32_t dynamic_base = static_cast<uint32_t>(__cvta_generic_to_shared(dynamic_shared));
  const uint32_t table_base = (dynamic_base + 0xffffu) & ~0xffffu;  // entry e, lane l: +256e + 4l
  unsigned char* table = dynamic_shared + (table_base - dynamic_base);
  float* scale_table = reinterpret_cast<float*>(table + 65536);
  // partial[buffer][warp][2 j + h][lane]: accumulators (4h, 4h + 1) of n-tile j.
  float2(*partial)[W][2 * NT][32] = reinterpret_cast<float2(*)[W][2 * NT][32]>(scale_table + 256);
  constexpr bool kPairedScales = kScaleRead == BpScaleRead::kPairs;
  constexpr bool kRowNested = kScaleRead == BpScaleRead::kSharedTableRowNested;
  constexpr bool kSharedTable = kScaleRead == BpScaleRead::kSharedTable || kRowNested;
  static_assert(!kPairedScales || std::is_same_v<Scales, PlainScales>);
  static_assert(!kSharedTable || std::is_same_v<Scales, DoubleQuantScales>);
  float scale_table_entry = 0.0f;  // thread i's entry of the double-quant table
  if constexpr (kSharedTable) {
    if (threadIdx.x < 256) scale_table_entry = __ldg(a.scales.table + threadIdx.x);
  }
  const uint32_t scale_table_base = table_base + 65536;
  const uint32_t lane_address = table_base | (4 * (threadIdx.x % 32));
  auto lookup = [lane_address](uint32_t word, int byte) {  // table entry of one code byte
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];"
                 : "=r"(v)
                 : "r"(__byte_perm(word, lane_address, 0x7604 | (byte << 4))));
    return v;
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int splits = a.splits;
  const int split = warp % splits;
  const int64_t K = a.cols, N = 2 * a.pairs, blocks = K / a.block_size;
  const int rows = int(a.m_total - a.m0 < 4 * NT ? a.m_total - a.m0 : 4 * NT);
  const int64_t units = a.ctas_per_group * a.groups;
  // This warp's contiguous slice of 64-element spans (the same in every unit), in groups of U
  // spans whose loads are issued together (the ring below holds R groups).
  const int steps = int(K / kBpSpan);
  const int begin = split * a.steps_per_split;
  const int end = begin + a.steps_per_split < steps ? begin + a.steps_per_split : steps;
  const uint32_t sel_lo = (g & 1) ? 0x1054 : 0x5410, sel_hi = (g & 1) ? 0x3254 : 0x5432;
  const int step_shift = a.block_shift - 6;

  // Where one work unit's operands are for this lane. Rows past N and activation rows past M
  // read clamped, valid addresses: they only feed mma rows / columns that are never stored.
  // B operand: column g is (m = g / 2, h' = g % 2); the x pair of step s goes to the half h'.
  // Lane (g, t) loads the scale of C column c = t of its quad (rows 2pa, 2pa + 1, 2pb, 2pb + 1)
  // and the quad shares them by shuffles.
  using ScaleRow = decltype(a.scales.RowOf(0, 0, 1, 1));
  struct Unit {
    int64_t grp, tile;  // tile: the first row pair of the warp's 16
    const uint4 *wa, *wb, *x;  // x: activation row 0 (row 4j + g / 2 is x_offset[j] further)
    ScaleRow scale;
    float nested;  // kRowNested: the rows' nested scale
  };
  int x_offset[NT];  // uint4s, the same in every unit (rows past M read row 0)
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int m = 4 * j + g / 2;
    x_offset[j] = int((m < rows ? m : 0) * (K / 8));
  }
  auto setup = [&](int64_t unit) {
    Unit u;
    // No division without a vmap batch; else 32-bit (units, 16 row pairs each, are < 2^32).
    const uint32_t per_group = uint32_t(a.ctas_per_group);
    u.grp = a.groups == 1 ? 0 : uint32_t(unit) / per_group;
    const int64_t cta = uint32_t(unit) - uint32_t(u.grp) * per_group;
    u.tile = (cta * (W / splits) + warp / splits) * 16;
    const int64_t pa = u.tile + g, pb = pa + 8;
    const int64_t ra = pa < a.pairs ? pa : 0, rb = pb < a.pairs ? pb : 0;
    const uint8_t* w0 = a.packed + u.grp * a.pairs * K + 16 * t;
    u.wa = reinterpret_cast<const uint4*>(w0 + ra * K) + 4 * begin;
    u.wb = reinterpret_cast<const uint4*>(w0 + rb * K) + 4 * begin;
    u.x = reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) +
                                         (u.grp * a.m_total + a.m0) * K + 16 * t) + 8 * begin;
    u.scale = a.scales.RowOf(u.grp, t < 2 ? 2 * ra + t : 2 * rb + t - 2, N, blocks);
    // The row's blocks are all in the nested group of its block 0 (K / block_size divides 256).
    if constexpr (kRowNested) u.nested = __ldg(u.scale.nested);
    return u;
  };

  struct Group {
    uint4 w[U][2];
    typename ScaleRow::Raw scale[U];  // decoded in compute, once the reads have landed
  };
  // Loads the group at span s (offset o spans from the unit's pointers). With kPairedScales
  // (plain scales, 64-element blocks, an even block count per row: every pair aligned) the
  // scales of spans (s + u, s + u + 1), s + u even, come in one 8-byte read, which takes one of
  // the 32 scale lines a warp's read touches (its lanes read 32 rows) off the L1 per span:
  // 3 - 6% of the kernel time (bench/NOTES.md, session 8). The read has no branch (a guarded
  // one measured no faster than v17): pairs past the slice's end, and the empty slices of the
  // last splits, read the pair ending at `end` (even there: slices start even, K / 64 is even).
  const int last_pair = end - 2;
  auto load = [&](Group& gr, const Unit& un, int s, int o) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s + u >= end) break;
      gr.w[u][0] = LoadWeights(un.wa + 4 * (o + u));
      gr.w[u][1] = LoadWeights(un.wb + 4 * (o + u));
      if constexpr (!kPairedScales) gr.scale[u] = un.scale.Fetch((s + u) >> step_shift);
    }
    if constexpr (kPairedScales) {
      static_assert(U % 2 == 0, "scales are read in span pairs");
#pragma unroll
      for (int u = 0; u < U; u += 2) {
        const int b = s + u < last_pair ? s + u : last_pair;
        const float2 v = __ldg(reinterpret_cast<const float2*>(un.scale.absmax + b));
        gr.scale[u] = v.x;
        gr.scale[u + 1] = v.y;
      }
    }
  };
  float acc[NT][4];
  auto compute = [&](const Group& gr, const Unit& un, int s, int o) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s + u >= end) break;
      // Activations load per span (L1 hits: every unit of the SM reads the same slices); the
      // registers go to weight bytes in flight.
      uint4 xs[NT][2];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        xs[j][0] = __ldg(un.x + x_offset[j] + 8 * (o + u));
        xs[j][1] = __ldg(un.x + x_offset[j] + 8 * (o + u) + 1);
      }
      float part[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.0f;
      const uint32_t wa_words[4] = {gr.w[u][0].x, gr.w[u][0].y, gr.w[u][0].z, gr.w[u][0].w};
      const uint32_t wb_words[4] = {gr.w[u][1].x, gr.w[u][1].y, gr.w[u][1].z, gr.w[u][1].w};
#pragma unroll
      for (int st = 0; st < 8; ++st) {
        const int byte = 2 * (st % 2);
        const uint32_t frag[4] = {lookup(wa_words[st / 2], byte), lookup(wb_words[st / 2], byte),
                                  lookup(wa_words[st / 2], byte + 1),
                                  lookup(wb_words[st / 2], byte + 1)};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t xw = reinterpret_cast<const uint32_t*>(&xs[j][0])[st];
          MmaType<T>::Mma(part[j], frag, __byte_perm(xw, 0, sel_lo), __byte_perm(xw, 0, sel_hi));
        }
      }
      const int blk = (s + u) >> step_shift;
      const float scale = kSharedTable ? DecodeStagedScale(un.scale, gr.scale[u], blk,
                                                           scale_table_base, kRowNested, un.nested)
                                       : un.scale.Decode(gr.scale[u], blk);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float sc = __shfl_sync(0xffffffffu, scale, (lane & ~3) | c);
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[j][c] = fmaf(sc, part[j][c], acc[j][c]);
      }
    }
  };

  // A ring of R load groups in registers: the loads of the group R - 1 ahead go out before a
  // group is computed, and the stream of groups runs on across work units (G groups each), so
  // the next unit's first loads are in flight during this unit's split-K sum.
  const int G = a.steps_per_split / U;
  Group ring[R];
  int64_t load_unit = blockIdx.x;
  int load_group = 0;
  Unit lu = setup(blockIdx.x);
  auto issue = [&](Group& gr) {  // loads the load cursor's group and advances the cursor
    if (load_unit < units) load(gr, lu, begin + load_group * U, load_group * U);
    if (++load_group == G) {
      load_group = 0;
      load_unit += gridDim.x;
      lu = setup(load_unit < units ? load_unit : int64_t(blockIdx.x));
    }
  };
  // The first loads go out before the CTA fills and waits for its tables.
#pragma unroll
  for (int r = 0; r < R - 1; ++r) issue(ring[r]);
  for (int i = threadIdx.x; i < 256 * 8; i += 32 * W) {
    const int e = i / 8;
    const uint32_t v = MmaType<T>::Pack(kDeviceCodebook[e & 15], kDeviceCodebook[e >> 4]);
    reinterpret_cast<uint4*>(table)[e * 16 + i % 8] = make_uint4(v, v, v, v);
  }
  if (kSharedTable && threadIdx.x < 256) scale_table[threadIdx.x] = scale_table_entry;
  __syncthreads();

  int parity = 0;  // the partial-sum buffer of this unit
  int64_t unit = blockIdx.x;
  // The values the setup reads from memory (double-quant offset and nested scale) come from
  // the load cursor's setup of the same unit (R - 1 < G groups ahead, the cursor is still in
  // it), read with the unit's first weight loads: the compute does not wait on its own reads.
  auto setup_compute = [&](int64_t next) {
    Unit u = setup(next < units ? next : int64_t(blockIdx.x));
    u.scale = lu.scale;
    if constexpr (kRowNested) u.nested = lu.nested;
    return u;
  };
  Unit cur = setup_compute(blockIdx.x);
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  // Output pair (v0, v1) of mma lane l, n-tile j, half h: rows 2p, 2p + 1 (p = tile + l / 4 +
  // 8h) of activation row 4j + l % 4.
  auto store = [&](int j, int h, int l, float v0, float v1) {
    T* out = static_cast<T*>(a.out) + (cur.grp * a.m_total + a.m0) * N;
    const int m = 4 * j + l % 4;
    const int64_t p = cur.tile + l / 4 + 8 * h;
    if (m < rows && p < a.pairs)
      *reinterpret_cast<uint32_t*>(out + m * N + 2 * p) = MmaType<T>::Pack(v0, v1);
  };
  auto finish_unit = [&]() {
    if (splits == 1) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) store(j, h, lane, acc[j][2 * h], acc[j][2 * h + 1]);
    } else {
      // Split-K sum, spread over the tile's splits x 32 threads: each sums one output pair over
      // the splits in split order (bit-stable run to run, no atomics) and stores it. The two
      // buffers let the next unit write its partial sums while this one's are still read.
      float2(*tile_partial)[2 * NT][32] = partial[parity] + (warp - split);
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          tile_partial[split][2 * j + h][lane] = make_float2(acc[j][2 * h], acc[j][2 * h + 1]);
      __syncthreads();
      for (int i = split * 32 + lane; i < 64 * NT; i += 32 * splits) {
        float2 sum = make_float2(0.0f, 0.0f);
        for (int sp = 0; sp < splits; ++sp) {
          const float2 v = tile_partial[sp][i / 32][i % 32];
          sum.x += v.x;
          sum.y += v.y;
        }
        store(i / 64, (i / 32) % 2, i % 32, sum.x, sum.y);
      }
      parity ^= 1;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    unit += gridDim.x;
    cur = setup_compute(unit);  // the cursor has issued R - 1 < G groups of this next unit
  };
  // G is a multiple of R (the launch rounds the slices), so every unit starts at ring slot 0.
  while (unit < units) {
    for (int group = 0; group < G; group += R) {
#pragma unroll
      for (int r = 0; r < R; ++r) {  // ring slot r holds the unit's group `group + r`
        issue(ring[(r + R - 1) % R]);
        compute(ring[r], cur, begin + (group + r) * U, (group + r) * U);
      }
    }
    finish_unit();
  }
}

// Splits of K and the persistent grid of the byte-pair kernel. A CTA's time is about
// rounds x (spans per warp per unit + the per-unit reduction, ~1 span), with rounds =
// ceil(units / SMs): the split count minimizing it balances the last round (28672x8192: 16
// splits, 7 rounds of 8 spans, instead of 8 splits, 4 rounds of 16 spans with the last round
// 39% full). Each warp keeps >= 2 load groups per unit.
constexpr int64_t kBpUnitOverheadSpans = 1;
template <typename T, int NT, int U, int R, typename Scales>
cudaError_t LaunchGemvBytePair(GemvArgs<Scales> a, int64_t groups, int sms, cudaStream_t stream) {
  const int64_t tiles = (a.pairs + 15) / 16;
  const int64_t steps = a.cols / kBpSpan;
  auto units_for = [&](int splits) {
    return (tiles + kBpWarps / splits - 1) / (kBpWarps / splits) * groups;
  };
  auto spans_per_split = [&](int splits) {  // a multiple of the ring, U x R spans
    return (steps + splits * U * R - 1) / (splits * U * R) * (U * R);
  };
  int splits = 1;
  int64_t best_cost = -1;
  for (int s = 1; s <= kBpWarps && (s == 1 || steps >= int64_t(U) * 2 * s); s *= 2) {
    const int64_t rounds = (units_for(s) + sms - 1) / sms;
    const int64_t cost = rounds * (spans_per_split(s) + kBpUnitOverheadSpans);
    if (best_cost < 0 || cost < best_cost) best_cost = cost, splits = s;
  }
  a.splits = splits;
  a.steps_per_split = int(spans_per_split(splits));
  const int64_t units = units_for(splits);
  a.groups = groups;
  a.ctas_per_group = units / groups;
  auto kernel = GemvBytePairKernel<T, NT, U, R, Scales, BpScaleRead::kPerSpan>;
  if constexpr (std::is_same_v<Scales, PlainScales>) {  // one block per span, an even count
    if (a.block_size == kBpSpan && (a.cols / kBpSpan) % 2 == 0)
      kernel = GemvBytePairKernel<T, NT, U, R, Scales, BpScaleRead::kPairs>;
  } else if (groups == 1) {
    const int64_t blocks = a.cols / a.block_size;
    kernel = kNestedBlockSize % blocks == 0
                 ? GemvBytePairKernel<T, NT, U, R, Scales, BpScaleRead::kSharedTableRowNested>
                 : GemvBytePairKernel<T, NT, U, R, Scales, BpScaleRead::kSharedTable>;
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kBpSharedBytes<NT>);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(units < sms ? units : sms)), 32 * kBpWarps, kBpSharedBytes<NT>,
           stream>>>(a);
  return cudaGetLastError();
}

// Spans of weights a lane holds in registers (in flight or being decoded), loaded in groups
// of kBpGroupSpans (4 x 32 bytes: a deeper ring spills or slows the loop, measured).
constexpr int kBpRingSpans = 4;
constexpr int kBpGroupSpans = 2;
template <typename T, int NT, typename Scales>
cudaError_t LaunchGemvBytePairRows(GemvArgs<Scales> a, int64_t groups, int sms,
                                   cudaStream_t stream) {
  return LaunchGemvBytePair<T, NT, kBpGroupSpans, kBpRingSpans / kBpGroupSpans, Scales>(
      a, groups, sms, stream);
}

// The byte-pair kernel where a CTA can have its shared memory (sm_80, sm_90) for M <= 8, else
// the 16-row-tile GEMV, 8 rows per launch (for M > 8 only on GPUs whose CTAs cannot have the
// tiled kernel's shared memory). sms: the device's SM count.
template <typename T, typename Scales>
cudaError_t LaunchGemvTensorCore(GemvArgs<Scales> a, int64_t groups, int sms, bool byte_pair,
                                 cudaStream_t stream) {
  if (byte_pair && a.m_total <= 4)
    return LaunchGemvBytePairRows<T, 1, Scales>(a, groups, sms, stream);
  if (byte_pair && a.m_total <= 8)
    return LaunchGemvBytePairRows<T, 2, Scales>(a, groups, sms, stream);
  cudaError_t err = cudaSuccess;
  for (a.m0 = 0; a.m0 < a.m_total && err == cudaSuccess; a.m0 += 8)
    err = LaunchGemvTensorCoreRows<T, Scales>(a, groups, stream);
  return err;
}

// ---------------------------------------------------------------- tiled tensor-core matmul

// Fused dequant + matmul for bf16 / f16 activations, power-of-two block_size >= 64 and M > 8
// (batched decode, speculative decoding, prefill). A CTA of 8 warps owns 256 weight rows
// (each warp WN = 2 16-row mma tiles; tile rows g and g + 8 are the two rows of pair g, decoded
// as in the 16-row-tile GEMV) for 8 * NT activation rows (NT = 2, 4, 8 or 16 by M) and one
// chunk of K, in stages of 2 spans (128 k). The kernel is bound by its instruction stream
// (mostly the decode) at 8 warps per SM, so a warp's WN x NT block of mma tiles uses each
// decoded A fragment for NT mma and each activation load for WN (the accumulators, 4 WN NT
// registers, stay within 128), and the block scale multiplies the decoded fragment in the
// activation dtype (the weight rounded as dequantize + dot rounds it; f16 activations need
// weights within f16 range, as there) so the mma accumulate across spans directly.
// A ring of 3 shared-memory slots holds each stage's activations (MT rows, shared by all 8
// warps) and packed weights; all of it moves by cp.async, two stages ahead of the compute. The
// block scales are read two spans ahead of their use and decoded one span ahead (a
// double-quantized scale's table and nested reads are dependent loads). With more activation
// rows than one tile, the CTAs of one weight slice are adjacent in the grid (the second read of
// the slice hits L2). K splits across CTAs when the row blocks alone would leave SMs idle: each
// split writes float32 partial sums to scratch and SumKSplitsKernel adds them in split order
// (deterministic).
constexpr int kGtWarps = 8;
constexpr int kGtStageSpans = 2;                       // 64-element spans per stage
constexpr int kGtRowStride = kGtStageSpans * 64 + 32;  // activation row stride in shared memory
constexpr int kGtRing = 3;                             // stages in shared memory
constexpr int kGtWarpTiles = 2;                          // 16-row mma tiles per warp (WN)
constexpr int kGtPairs = kGtWarps * 8 * kGtWarpTiles;    // row pairs per CTA
constexpr int GtSlotBytes(int nt) {  // one stage: 8 nt activation rows and the CTA's weights
  return 8 * nt * kGtRowStride * 2 + kGtPairs * kGtStageSpans * 64;
}
// The pair table, the ring and the double-quant scale table (1 KB; unused with plain scales).
constexpr int GtSharedBytes(int nt) {
  return kPairTableBytes + kGtRing * GtSlotBytes(nt) + 256 * 4;
}

// Calls fn(std::integral_constant<int, NT>) for a launch's n-tile count (2, 4, 8 or 16).
template <typename Fn>
cudaError_t DispatchTileNt(int nt, Fn&& fn) {
  switch (nt) {
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    default: return fn(std::integral_constant<int, 16>{});
  }
}

template <typename Scales>
struct TileArgs {
  const void* x;          // [G, m_total, K]
  const uint8_t* packed;  // [G, N/2, K]
  Scales scales;
  void* out;              // [G, m_total, N]
  float* partial;         // [k_splits, G, m_total, N] when k_splits > 1
  int64_t groups, m_total, pairs, cols;
  int64_t row_blocks, m_tiles;
  int k_splits, spans_per_split, block_shift;
};

// The M <= 16 tile has registers (<= 128) and shared memory (95 KB) for two CTAs per SM.
template <int NT>
constexpr int kGtMinCtasPerSm = NT == 2 ? 2 : 1;

template <typename Scales>
constexpr bool kIsDoubleQuant = std::is_same_v<Scales, DoubleQuantScales>;

// kRowNested (double-quant scales where K / block_size divides 256): every row's blocks lie in
// one nested group, so each row's nested scale is read once per CTA instead of once per span.
template <typename T, int NT, typename Scales, bool kRowNested>
__global__ void __launch_bounds__(32 * kGtWarps, kGtMinCtasPerSm<NT>)
    GemmTileKernel(TileArgs<Scales> a) {
  constexpr int S = kGtStageSpans, MT = 8 * NT, WN = kGtWarpTiles;
  constexpr int C = S * 8;  // 16-byte activation chunks per row and stage
  static_assert(S % 2 == 0, "the span loop's scale pipeline has the same phase every stage");
  static_assert(MT * C % (32 * kGtWarps) == 0, "every thread copies the same activation chunks");
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  uint4* pair_table_storage = reinterpret_cast<uint4*>(dynamic_shared);
  const PairTable<T> pair_table(pair_table_storage);
  unsigned char* ring = dynamic_shared + kPairTableBytes;  // slots: x [MT][kGtRowStride], weights
  const uint32_t ring_base = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  float* dq_table = reinterpret_cast<float*>(ring + kGtRing * GtSlotBytes(NT));
  const uint32_t dq_table_base = ring_base + kGtRing * GtSlotBytes(NT);
  constexpr bool kDoubleQuant = kIsDoubleQuant<Scales>;
  static_assert(kDoubleQuant || !kRowNested, "row-nested reads are for double-quant scales");

  int64_t b = blockIdx.x;
  const int64_t mt = b % a.m_tiles;
  b /= a.m_tiles;
  const int ks = int(b % a.k_splits);
  b /= a.k_splits;
  const int64_t rb = b % a.row_blocks, grp = b / a.row_blocks;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t K = a.cols, N = 2 * a.pairs, blocks = K >> a.block_shift;
  const int64_t pair0 = (rb * kGtWarps + warp) * 8 * WN + g;  // tile wi: pair0 + 8 wi
  const int64_t m_base = mt * MT;
  const int rows = int(a.m_total - m_base < MT ? a.m_total - m_base : MT);
  const int steps = int(K / kTcSpan), step_shift = a.block_shift - 6;
  const int begin = ks * a.spans_per_split;
  const int end = begin + a.spans_per_split < steps ? begin + a.spans_per_split : steps;

  // Tile wi's weights and scales (rows past N compute on pair 0 and are never stored). A quad
  // needs four row scales per span (tiles 0, 1 x even, odd rows). Plain scales: each lane loads
  // all four. Double-quant scales up to NT = 8 (kQuadScales): lane t reads and decodes one,
  // `own_row` (row `t & 1` of tile t / 2; its raw scale travels in raw_even[0]), and the quad
  // shares them by shuffles: a quarter of the loads and decodes (at NT = 16 the shuffles'
  // registers made ptxas spill).
  constexpr bool kQuadScales = kDoubleQuant && NT <= 8;
  static_assert(!kQuadScales || 2 * WN == 4, "one double-quant row scale per lane of a quad");
  const uint8_t* wrow[WN];
  using Row = decltype(a.scales.RowOf(0, 0, 1, 1));
  Row row_even[WN] = {}, row_odd[WN] = {}, own_row = {};
#pragma unroll
  for (int wi = 0; wi < WN; ++wi) {
    const int64_t p = pair0 + 8 * wi < a.pairs ? pair0 + 8 * wi : 0;
    wrow[wi] = a.packed + (grp * a.pairs + p) * K + 16 * t;
    if constexpr (!kQuadScales) {
      row_even[wi] = a.scales.RowOf(grp, 2 * p, N, blocks);
      row_odd[wi] = a.scales.RowOf(grp, 2 * p + 1, N, blocks);
    }
  }
  float own_nested = 0.0f;  // kQuadScales and kRowNested: the nested scale of the lane's row
  if constexpr (kQuadScales) {
    const int64_t p = pair0 + 8 * (t >> 1) < a.pairs ? pair0 + 8 * (t >> 1) : 0;
    own_row = a.scales.RowOf(grp, 2 * p + (t & 1), N, blocks);
    if constexpr (kRowNested) own_nested = LoadConstant(own_row.nested);
  }
  float nested_even[WN] = {}, nested_odd[WN] = {};  // the same, per row, without kQuadScales
  if constexpr (kRowNested && !kQuadScales) {
#pragma unroll
    for (int wi = 0; wi < WN; ++wi) {
      nested_even[wi] = LoadConstant(row_even[wi].nested);
      nested_odd[wi] = LoadConstant(row_odd[wi].nested);
    }
  }
  const T* x = static_cast<const T*>(a.x) + (grp * a.m_total + m_base) * K;
  const int x_row0 = threadIdx.x / C, x_chunk = threadIdx.x % C;  // this thread's copies

  // Contraction order: in mma steps 2h and 2h + 1 of a span, lane (g, t) covers the eight k
  // 32 h + 8 t .. 32 h + 8 t + 7, four per step: its A fragments decode those code bytes of pair
  // g (one 8-byte load), its B fragments are one 16-byte load of the activations at the same k.
  // Pair g's 64 bytes of a span sit in 16-byte chunks swizzled by pair (chunk c at c ^ (g & 2))
  // and the activation rows 320 bytes apart, so both loads are conflict-free.
  const int swizzle = g & 2;
  // Pair g's 64 bytes of tile wi, span u in a slot: weight_offset + (wi * S + u) * 512.
  const int weight_offset = 8 * NT * kGtRowStride * 2 + warp * WN * S * 512 + g * 64;

  // Stage i (spans s0 .. s0 + S - 1, s0 = begin + S i) into slot i % 3: the activations (MT
  // rows x C chunks; rows past M repeat row 0, chunks past this CTA's K range are zero-filled
  // and never read) and the weights (each lane copies chunk t of pair g). One copy group per
  // stage, empty past the end.
  auto issue = [&](int stage) {
    const int s0 = begin + stage * S;
    const uint32_t slot = ring_base + (stage % kGtRing) * GtSlotBytes(NT);
    if (s0 < end) {
      const int64_t k = int64_t(s0) * 64 + 8 * x_chunk;
      const bool valid = k < int64_t(end) * 64;
      const T* src = x + (valid ? k : 0);
#pragma unroll
      for (int j = 0; j < MT * C / (32 * kGtWarps); ++j) {
        const int r = x_row0 + j * (32 * kGtWarps / C);
        CopyAsync16(slot + (r * kGtRowStride + 8 * x_chunk) * 2, src + (r < rows ? r : 0) * K,
                    valid);
      }
#pragma unroll
      for (int wi = 0; wi < WN; ++wi)
#pragma unroll
        for (int u = 0; u < S; ++u) {
          const bool valid = s0 + u < end;
          CopyAsync16(slot + weight_offset + (wi * S + u) * 512 + 16 * (t ^ swizzle),
                      wrow[wi] + 64 * (valid ? s0 + u : s0), valid);
        }
    }
    CopyAsyncCommit();
  };
  // The scale pipeline: at span i the raw scales of span i + 1 are decoded and those of span
  // i + 2 fetched.
  using Raws = typename Row::Raw[WN];
  Raws raw_even, raw_odd;
  float next_even[WN], next_odd[WN];
  auto fetch = [&](int span) {
    if (span >= end) return;
    if constexpr (kQuadScales) {
      raw_even[0] = own_row.Fetch(span >> step_shift);
    } else {
#pragma unroll
      for (int wi = 0; wi < WN; ++wi) {
        raw_even[wi] = row_even[wi].Fetch(span >> step_shift);
        raw_odd[wi] = row_odd[wi].Fetch(span >> step_shift);
      }
    }
  };
  // Double-quant scales take their table entry from the CTA's shared copy (a 32-bit LDS; the
  // global read was one more dependent load in the span loop).
  auto decode_one = [&](const Row& row, typename Row::Raw raw, float nested, int blk) {
    return DecodeStagedScale(row, raw, blk, dq_table_base, kRowNested, nested);
  };
  auto decode_from = [&](const Raws& even, const Raws& odd, int span) {
    if (span >= end) return;
    const int blk = span >> step_shift;
    if constexpr (kQuadScales) {
      const float own = decode_one(own_row, even[0], own_nested, blk);
#pragma unroll
      for (int wi = 0; wi < WN; ++wi) {
        next_even[wi] = __shfl_sync(0xffffffffu, own, (lane & ~3) | (2 * wi));
        next_odd[wi] = __shfl_sync(0xffffffffu, own, (lane & ~3) | (2 * wi + 1));
      }
    } else {
#pragma unroll
      for (int wi = 0; wi < WN; ++wi) {
        next_even[wi] = decode_one(row_even[wi], even[wi], nested_even[wi], blk);
        next_odd[wi] = decode_one(row_odd[wi], odd[wi], nested_odd[wi], blk);
      }
    }
  };
  auto decode = [&](int span) { decode_from(raw_even, raw_odd, span); };

  float acc[WN][NT][4];
#pragma unroll
  for (int wi = 0; wi < WN; ++wi)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[wi][j][c] = 0.0f;
  auto compute = [&](int stage) {
    const int s0 = begin + stage * S;
    const unsigned char* slot = ring + (stage % kGtRing) * GtSlotBytes(NT);
    const unsigned char* wlane = slot + weight_offset + 8 * (t & 1);
    const T* xb = reinterpret_cast<const T*>(slot) + g * kGtRowStride + 8 * t;
#pragma unroll
    for (int u = 0; u < S; ++u) {
      const int span = s0 + u;
      if (span >= end) break;
      uint32_t se[WN], so[WN];  // this span's scales as value pairs in the activation dtype
#pragma unroll
      for (int wi = 0; wi < WN; ++wi) {
        se[wi] = MmaType<T>::Pack(next_even[wi], next_even[wi]);
        so[wi] = MmaType<T>::Pack(next_odd[wi], next_odd[wi]);
      }
      decode(span + 1);
      fetch(span + 2);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t frag[WN][2][4];
#pragma unroll
        for (int wi = 0; wi < WN; ++wi) {
          const uint2 words = *reinterpret_cast<const uint2*>(
              wlane + (wi * S + u) * 512 + 16 * ((2 * h + (t >> 1)) ^ swizzle));
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            pair_table.Fragment(q == 0 ? words.x : words.y, frag[wi][q]);
            frag[wi][q][0] = MmaType<T>::Mul(frag[wi][q][0], se[wi]);
            frag[wi][q][1] = MmaType<T>::Mul(frag[wi][q][1], so[wi]);
            frag[wi][q][2] = MmaType<T>::Mul(frag[wi][q][2], se[wi]);
            frag[wi][q][3] = MmaType<T>::Mul(frag[wi][q][3], so[wi]);
          }
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4 xv =
              *reinterpret_cast<const uint4*>(xb + 8 * j * kGtRowStride + 64 * u + 32 * h);
#pragma unroll
          for (int wi = 0; wi < WN; ++wi) {
            MmaType<T>::Mma(acc[wi][j], frag[wi][0], xv.x, xv.y);
            MmaType<T>::Mma(acc[wi][j], frag[wi][1], xv.z, xv.w);
          }
        }
      }
    }
  };

  // The first two stages' copies and the first spans' scale reads go out before the table
  // fills; the first span's scales decode once the tables are visible. Each step then waits
  // for its own stage's copies, and one barrier both makes every thread's copies of it visible
  // and frees the slot computed one step before, into which the stage two ahead goes out
  // before the compute.
  const int stages = (end - begin + S - 1) / S;
  issue(0);
  issue(1);
  fetch(begin);
  Raws first_even, first_odd;
#pragma unroll
  for (int wi = 0; wi < WN; ++wi) first_even[wi] = raw_even[wi], first_odd[wi] = raw_odd[wi];
  fetch(begin + 1);
  PairTable<T>::Fill(pair_table_storage);
  if constexpr (kDoubleQuant) {
    for (int i = threadIdx.x; i < 256; i += 32 * kGtWarps)
      dq_table[i] = __ldg(a.scales.table + grp * 256 + i);
    __syncthreads();
  }
  decode_from(first_even, first_odd, begin);  // nothing where a split is past the end of K
  for (int stage = 0; stage < stages; ++stage) {
    CopyAsyncWait<kGtRing - 2>();  // the oldest of the ring's stages has landed
    __syncthreads();
    issue(stage + 2);
    compute(stage);
  }

  // Each lane holds rows 2 pair and 2 pair + 1 for activation rows 8 j + 2 t and 8 j + 2 t + 1:
  // one 2-element store per activation row.
  const bool direct = a.k_splits == 1;
#pragma unroll
  for (int wi = 0; wi < WN; ++wi) {
    const int64_t pair = pair0 + 8 * wi;
    if (pair >= a.pairs) continue;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int m = 8 * j + 2 * t + r;
        if (m >= rows) continue;
        const int64_t at = (grp * a.m_total + m_base + m) * N + 2 * pair;
        if (direct)
          *reinterpret_cast<uint32_t*>(static_cast<T*>(a.out) + at) =
              MmaType<T>::Pack(acc[wi][j][r], acc[wi][j][2 + r]);
        else
          *reinterpret_cast<float2*>(a.partial + ks * a.groups * a.m_total * N + at) =
              make_float2(acc[wi][j][r], acc[wi][j][2 + r]);
      }
  }
}

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

// The n-tile count for M: the widest tile up to M (decode amortized over more rows) whose
// shared memory a CTA can have, else narrower ones (sm_80: up to 8; sm_86: 2); 0: none fits.
int ChooseTileNt(int64_t m_total, int shared_optin) {
  int nt = m_total <= 16 ? 2 : m_total <= 32 ? 4 : m_total <= 64 ? 8 : 16;
  while (nt >= 2 && shared_optin < GtSharedBytes(nt)) nt /= 2;
  return nt >= 2 ? nt : 0;
}

// Whether a launch takes the row-nested kernel: double-quant scales, K / block_size divides 256.
template <typename Scales>
bool TileRowNested(const TileArgs<Scales>& a) {
  return kIsDoubleQuant<Scales> && kNestedBlockSize % (a.cols >> a.block_shift) == 0;
}

// Sets the kernels' shared-memory size on `device` (before their first launch there) and gives
// how many of their CTAs an SM holds (the same for both forms); once per device and process
// (the attribute lasts with the device's context; the answer is kept for later calls).
template <typename T, int NT, typename Scales>
cudaError_t PrepareGemmTile(int device, int* ctas_per_sm) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> prepared[kMaxDevices];  // CTAs per SM + 1 once prepared, else 0
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    if (const int v = prepared[device].load(std::memory_order_relaxed); v > 0) {
      *ctas_per_sm = v - 1;
      return cudaSuccess;
    }
  }
  constexpr bool kDoubleQuant = kIsDoubleQuant<Scales>;
  auto kernel = GemmTileKernel<T, NT, Scales, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         GtSharedBytes(NT));
  if (err == cudaSuccess && kDoubleQuant)
    err = cudaFuncSetAttribute(GemmTileKernel<T, NT, Scales, kDoubleQuant>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, GtSharedBytes(NT));
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas_per_sm, kernel, 32 * kGtWarps,
                                                        GtSharedBytes(NT));
  if (err == cudaSuccess && cached)
    prepared[device].store(*ctas_per_sm + 1, std::memory_order_relaxed);
  return err;
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

KSplit ChooseKSplit(int64_t ctas, int64_t slots, int64_t steps, int64_t granule,
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

// The grid of the tiled kernel for an n-tile count: its K split (ChooseKSplit) over slots = SMs
// x the CTAs an SM holds, in stages of two spans, at least four stages per CTA (shorter ones
// measured slower: 4096^2 at M = 16 split 16 ways took 14.5 µs, 8 ways 12.4).
struct TilePlan {
  int nt = 0;
  int64_t row_blocks = 0, m_tiles = 0;
  int k_splits = 1, spans_per_split = 0;
  int64_t partial_bytes = 0;  // scratch for the split-K partial sums
};

TilePlan PlanGemmTile(int nt, int64_t groups, int64_t m_total, int64_t pairs, int64_t cols,
                      int64_t slots) {
  TilePlan plan;
  plan.nt = nt;
  plan.row_blocks = (pairs + kGtPairs - 1) / kGtPairs;
  plan.m_tiles = (m_total + 8 * nt - 1) / (8 * nt);
  // A split CTA's float32 partial sums (8 nt x 2 kGtPairs x 4 bytes, written, then read by the
  // sum, mostly in L2) weigh about as much as nt spans of its weights (kGtPairs x 64 bytes).
  const KSplit split = ChooseKSplit(groups * plan.row_blocks * plan.m_tiles, slots,
                                    cols / kTcSpan, kGtStageSpans, nt, 16);
  plan.k_splits = split.splits;
  plan.spans_per_split = int(split.per);
  if (plan.k_splits > 1)
    plan.partial_bytes = int64_t(plan.k_splits) * groups * m_total * 2 * pairs * 4;
  return plan;
}

// Launches the tiled kernel (PrepareGemmTile has set its shared-memory size) and, with K split,
// the sum of the splits.
template <typename T, int NT, typename Scales>
cudaError_t LaunchGemmTileNt(const TileArgs<Scales>& a, cudaStream_t stream) {
  const int64_t ctas = a.groups * a.row_blocks * a.k_splits * a.m_tiles;
  constexpr bool kDoubleQuant = kIsDoubleQuant<Scales>;
  auto kernel = TileRowNested(a) ? GemmTileKernel<T, NT, Scales, kDoubleQuant>
                                 : GemmTileKernel<T, NT, Scales, false>;
  kernel<<<dim3(unsigned(ctas)), 32 * kGtWarps, GtSharedBytes(NT), stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.k_splits == 1) return err;
  return LaunchSumKSplits<T>(a.partial, a.out, a.groups * a.m_total * 2 * a.pairs, a.k_splits,
                             stream);
}

template <typename T, typename Scales>
cudaError_t LaunchGemmTile(TileArgs<Scales> a, const TilePlan& plan, cudaStream_t stream) {
  a.row_blocks = plan.row_blocks;
  a.m_tiles = plan.m_tiles;
  a.k_splits = plan.k_splits;
  a.spans_per_split = plan.spans_per_split;
  return DispatchTileNt(plan.nt, [&](auto nt) {
    return LaunchGemmTileNt<T, decltype(nt)::value, Scales>(a, stream);
  });
}

// ---------------------------------------------------------------- wgmma matmul (sm_90a)

// Fused dequant + matmul on Hopper's warpgroup MMA (sm_90a) for bf16 / f16 activations,
// power-of-two block_size >= 64 and M above kWgMinRows: a warp-specialized CTA of three
// warpgroups. One thread of the first streams 64-k stages of the activations (TMA with the
// 128-byte swizzle wgmma reads B in) and of the packed weights into a ring of shared-memory
// slots, each slot's arrival tracked by an mbarrier; the other two warpgroups each own TL m64
// tiles of 32 row pairs (mma rows g and g + 8 of a warp are the two rows of one pair, as in the
// 16-row-tile decode), and per stage decode their A fragments from the slot into registers
// (PairTable, scaled in the activation dtype as the tiled kernel does) and issue m64nNk16
// wgmma with B, N activation rows, read from the slot. A stage is done in two halves of two
// k16 steps, with fragment sets alternating, so a half's decode runs while the half before it
// multiplies. The decode, not the MMA or L2, sets the pace (ncu at M = 2048,
// TL = 2: tensor pipe 54% busy, L2 36%), hence TL = 1 wherever M fills 256 rows: each decoded
// fragment feeds twice the MMA. Where the tiles alone would leave SMs idle, K splits across
// CTAs: in two, a thread-block cluster of the two CTAs adds up their accumulators over
// distributed shared memory; in more, float32 partial sums and SumKSplitsKernel (both in split
// order: deterministic).
constexpr int kWgThreads = 384;     // producer warpgroup + two consumer warpgroups
constexpr int64_t kWgMinRows = 64;  // M from which the launch prefers this kernel (sm_90)
// The CTA shapes: TL m64 tiles per consumer warpgroup, 64 TL row pairs x MT activation rows per
// CTA (the wgmma N), TL MT <= 256 (accumulators: TL MT / 2 registers). (2, 128) up to 128
// activation rows, or (1, 128) where (2, 128) would leave most SMs without a CTA (twice the
// CTAs, less K split: 4096^2 at M = 128 21.4 -> 17.8 µs; at M = 256 the same switch from
// (1, 256) was slower, 25.1 -> 27.8); (1, 256) above 128 rows (each decoded weight fragment
// feeds twice the MMA).
template <int TL, int MT>
struct WgShape {
  static_assert(TL * MT <= 256);
  static constexpr int kTokens = MT;
  static constexpr int kPairs = 64 * TL;
  static constexpr int kActBytes = kTokens * 64 * 2;  // one stage's activations
  static constexpr int kSlotBytes = kActBytes + kPairs * 64;
  static constexpr int kRingBytes = 193 * 1024;  // beside the table, within 227 KB
  static constexpr int kStages = kRingBytes / kSlotBytes < 6 ? kRingBytes / kSlotBytes : 6;
  // Shared memory from the 1024-byte aligned base: the ring, the pair table, the double-quant
  // scale table (1 KB), the mbarriers (full and empty per slot) and each stage's row scales (a
  // pair of dtype values per row, 8 bytes per row pair); 1 KB of alignment slack before it.
  static constexpr int kPairTableOffset = kStages * kSlotBytes;
  static constexpr int kDqTableOffset = kPairTableOffset + kPairTableBytes;
  static constexpr int kBarsOffset = kDqTableOffset + 1024;
  static constexpr int kScaleRingOffset = kBarsOffset + 16 * kStages;
  static constexpr int kSharedBytes = 1024 + kScaleRingOffset + kStages * kPairs * 8;
};

// The wgmma kernel's operands besides its tensor maps (from the handler's TileArgs at launch).
template <typename Scales>
struct WgArgs {
  Scales scales;
  void* out;       // [G, m_total, N]
  float* partial;  // [k_splits, G, m_total, N] when K is split and the splits are no cluster
  int64_t groups, m_total, pairs, cols;
  int row_blocks, m_tiles, k_splits, stages_per_split, block_shift;
  bool cluster;  // the k_splits CTAs of a tile are a cluster, adding up over shared memory
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void MbarrierWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred done;\n"
      "WAIT_%=:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
      "@!done bra WAIT_%=;\n}" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Box {c0, c1, c2} of a 3-D tensor map into shared memory, completing on mbarrier `bar`.
__device__ __forceinline__ void TmaLoad3d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                          int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
// K-major B operand of one k16 step: 8-row groups of 128-byte rows 1024 bytes apart, 128-byte
// swizzle (the TMA box's); the slot is 1024-byte aligned, the step's start 32 bytes further.
__device__ __forceinline__ uint64_t WgmmaDescriptorSw128(uint32_t address) {
  return uint64_t((address & 0x3ffff) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}
// The accumulator operands of a wgmma asm statement: the register list "%0, ..., %N-1" and
// the "+f" bindings of d[0 .. N-1], for N = 64 and 128.
#define JAX_NF4_REGS64                                                                            \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                        \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "              \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "              \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define JAX_NF4_REGS128                                                                           \
  JAX_NF4_REGS64 ", "                                                                             \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "              \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "              \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "  \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define JAX_NF4_ACC8(i)                                                                           \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]),     \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define JAX_NF4_ACC64(i)                                                                          \
  JAX_NF4_ACC8(i), JAX_NF4_ACC8(i + 8), JAX_NF4_ACC8(i + 16), JAX_NF4_ACC8(i + 24),               \
      JAX_NF4_ACC8(i + 32), JAX_NF4_ACC8(i + 40), JAX_NF4_ACC8(i + 48), JAX_NF4_ACC8(i + 56)
// acc += A (64 x 16, registers) B (16 x N, shared memory), float32 accumulation (wgmma
// m64nNk16, the A fragment from registers), for N = 128 and 256.
template <typename T, int N>
__device__ __forceinline__ void WgmmaRs(float (&d)[N / 2], const uint32_t (&a)[4],
                                        uint64_t desc_b) {
  static_assert(N == 128 || N == 256);
  constexpr bool kBf16 = MmaType<T>::kBf16;
#define JAX_NF4_A_OPERANDS "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1)
  if constexpr (N == 128 && kBf16) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" JAX_NF4_REGS64
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : JAX_NF4_ACC64(0)
                 : JAX_NF4_A_OPERANDS);
  } else if constexpr (N == 128) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {" JAX_NF4_REGS64
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : JAX_NF4_ACC64(0)
                 : JAX_NF4_A_OPERANDS);
  } else if constexpr (kBf16) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" JAX_NF4_REGS128
                 "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
                 : JAX_NF4_ACC64(0), JAX_NF4_ACC64(64)
                 : JAX_NF4_A_OPERANDS);
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {" JAX_NF4_REGS128
                 "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
                 : JAX_NF4_ACC64(0), JAX_NF4_ACC64(64)
                 : JAX_NF4_A_OPERANDS);
  }
#undef JAX_NF4_A_OPERANDS
}
#undef JAX_NF4_REGS64
#undef JAX_NF4_REGS128
#undef JAX_NF4_ACC8
#undef JAX_NF4_ACC64
// A quad's 64 bytes of one row pair and stage (lane t holding bytes 16t .. 16t + 15 as w)
// redistributed so that lane t gets the bytes of its A fragments: v[s] = bytes 16s + 2t,
// 16s + 2t + 1, 16s + 2t + 8, 16s + 2t + 9 (k16 step s; the word PairTable::Fragment takes).
__device__ __forceinline__ void QuadTranspose(const uint4& w, int t, uint32_t (&v)[4]) {
  uint32_t r[4];
#pragma unroll
  for (int d = 0; d < 4; ++d) {
    const int u = t ^ d;  // the lane this word goes to: 16-bit half u of both 8-byte chunks
    const uint32_t lo = (u & 2) ? w.y : w.x, hi = (u & 2) ? w.w : w.z;
    const uint32_t word = __byte_perm(lo, hi, (u & 1) ? 0x7632 : 0x5410);
    r[d] = d == 0 ? word : __shfl_xor_sync(0xffffffffu, word, d);  // from lane t ^ d
  }
#pragma unroll
  for (int s = 0; s < 4; ++s) {  // v[s] came from lane s, i.e. d = s ^ t
    const int d = s ^ t;
    v[s] = (d & 2) ? ((d & 1) ? r[3] : r[2]) : ((d & 1) ? r[1] : r[0]);
  }
}
#endif

template <typename T, typename Scales, int TL, int MT>
__global__ void __launch_bounds__(kWgThreads, 1)
    GemmWgmmaKernel(const __grid_constant__ CUtensorMap x_map,
                    const __grid_constant__ CUtensorMap w_map, WgArgs<Scales> a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = WgShape<TL, MT>;
  constexpr int kStages = Shape::kStages, kTokens = Shape::kTokens;
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  const uint32_t raw_base = SharedAddress(dynamic_shared);
  const uint32_t base = (raw_base + 1023) & ~1023u;  // slots: 1024-byte aligned (swizzle)
  uint4* table_storage =
      reinterpret_cast<uint4*>(dynamic_shared + (base - raw_base) + Shape::kPairTableOffset);
  const uint32_t dq_table = base + Shape::kDqTableOffset;
  const uint32_t bars = base + Shape::kBarsOffset;
  auto full = [&](int slot) { return bars + 8 * slot; };
  auto empty = [&](int slot) { return bars + 8 * (kStages + slot); };
  // Row pair p's scales of the stage in `slot`: {even, even}, {odd, odd} in the dtype.
  const uint32_t scale_ring = base + Shape::kScaleRingOffset;
  auto scales_of = [&](int slot, int p) { return scale_ring + 8 * (slot * Shape::kPairs + p); };

  // The k_splits CTAs of one tile are one cluster (consecutive blocks; rank = K split).
  int64_t b = blockIdx.x;
  const int ks = int(b % a.k_splits);
  b /= a.k_splits;
  const int mt = int(b % a.m_tiles);
  b /= a.m_tiles;
  const int rb = int(b % a.row_blocks), grp = int(b / a.row_blocks);
  const int first = ks * a.stages_per_split;
  const int total = int(a.cols / 64);
  const int count = a.stages_per_split < total - first ? a.stages_per_split : total - first;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 128;" ::"r"(full(s)) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 256;" ::"r"(empty(s)) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&x_map)) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&w_map)) : "memory");
  }
  PairTable<T>::Fill(table_storage);
  constexpr bool kDoubleQuant = kIsDoubleQuant<Scales>;
  if constexpr (kDoubleQuant) {  // the group's 256-entry scale table, read by LDS below
    for (int e = threadIdx.x; e < 256; e += kWgThreads)
      asm volatile("st.shared.f32 [%0], %1;" ::"r"(dq_table + 4 * e),
                   "f"(__ldg(a.scales.table + int64_t(grp) * 256 + e)));
  }
  __syncthreads();

  const int64_t N = 2 * a.pairs, blocks = a.cols >> a.block_shift;
  const int step_shift = a.block_shift - 6;
  if (threadIdx.x < 128) {
    // The producer warpgroup: thread 0 issues every stage's two copies; thread p < kPairs
    // decodes row pair p's two scales of every stage into the scale ring (the double-quant
    // table read from shared memory; where a row's blocks lie in one nested group, K /
    // block_size dividing 256, its nested scale read once), one stage ahead of its raw reads.
    // Each of the 128 threads arrives on the stage's full barrier after its writes.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    const int p = threadIdx.x;
    const bool decodes = p < Shape::kPairs;
    const int64_t pair = int64_t(rb) * Shape::kPairs + p;
    const int64_t row = 2 * (decodes && pair < a.pairs ? pair : 0);  // past N: pair 0, unused
    using Row = decltype(a.scales.RowOf(0, 0, 1, 1));
    const Row even_row = a.scales.RowOf(grp, row, N, blocks);
    const Row odd_row = a.scales.RowOf(grp, row + 1, N, blocks);
    const bool row_nested = kDoubleQuant && kNestedBlockSize % blocks == 0;
    float nested_even = 0.0f, nested_odd = 0.0f;
    if constexpr (kDoubleQuant) {
      nested_even = LoadConstant(even_row.nested);
      nested_odd = LoadConstant(odd_row.nested);
    }
    typename Row::Raw raw_even{}, raw_odd{};
    auto fetch = [&](int stage) {
      const int blk = (first + stage) >> step_shift;
      raw_even = even_row.Fetch(blk);
      raw_odd = odd_row.Fetch(blk);
    };
    if (decodes) fetch(0);
    for (int i = 0; i < count; ++i) {
      const int slot = i % kStages;
      if (i >= kStages) MbarrierWait(empty(slot), ((i / kStages) + 1) & 1);
      if (threadIdx.x == 0) {
        asm volatile("mbarrier.expect_tx.shared::cta.b64 [%0], %1;" ::"r"(full(slot)),
                     "r"(Shape::kSlotBytes)
                     : "memory");
        const int k0 = (first + i) * 64;
        const uint32_t dst = base + slot * Shape::kSlotBytes;
        TmaLoad3d(dst, &x_map, k0, mt * kTokens, grp, full(slot));
        TmaLoad3d(dst + Shape::kActBytes, &w_map, k0, rb * Shape::kPairs, grp, full(slot));
      }
      if (decodes) {
        const int blk = (first + i) >> step_shift;
        const float even =
            DecodeStagedScale(even_row, raw_even, blk, dq_table, row_nested, nested_even);
        const float odd = DecodeStagedScale(odd_row, raw_odd, blk, dq_table, row_nested, nested_odd);
        if (i + 1 < count) fetch(i + 1);
        asm volatile("st.shared.v2.u32 [%0], {%1, %2};" ::"r"(scales_of(slot, p)),
                     "r"(MmaType<T>::Pack(even, even)), "r"(MmaType<T>::Pack(odd, odd))
                     : "memory");
      }
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(full(slot)) : "memory");
    }
    if (a.cluster) {  // the consumers' two barriers around their exchange
      cooperative_groups::this_cluster().sync();
      cooperative_groups::this_cluster().sync();
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");

  const int ct = threadIdx.x - 128, cwg = ct / 128, warp = (ct % 128) / 32;
  const int lane = ct % 32, g = lane / 4, t = lane % 4;
  const PairTable<T> pair_table(table_storage);
  int pair_in_cta[TL];
  int64_t pair[TL];
#pragma unroll
  for (int j = 0; j < TL; ++j) {
    pair_in_cta[j] = 32 * (TL * cwg + j) + 8 * warp + g;
    pair[j] = int64_t(rb) * Shape::kPairs + pair_in_cta[j];
  }

  float acc[TL][kTokens / 2];
#pragma unroll
  for (int j = 0; j < TL; ++j)
#pragma unroll
    for (int c = 0; c < kTokens / 2; ++c) acc[j][c] = 0.0f;
  uint32_t frag_a[TL][2][4], frag_b[TL][2][4];  // [tile][step of the half][register]

  for (int i = 0; i < count; ++i) {
    const int slot = i % kStages;
    MbarrierWait(full(slot), (i / kStages) & 1);
    const uint32_t slot_base = base + slot * Shape::kSlotBytes;
    uint32_t se[TL], so[TL];  // this stage's scales as value pairs in the activation dtype
#pragma unroll
    for (int j = 0; j < TL; ++j)
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                   : "=r"(se[j]), "=r"(so[j])
                   : "r"(scales_of(slot, pair_in_cta[j])));
    uint32_t v[TL][4];
#pragma unroll
    for (int j = 0; j < TL; ++j) {
      uint4 w;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                   : "r"(slot_base + Shape::kActBytes + pair_in_cta[j] * 64 + 16 * t));
      QuadTranspose(w, t, v[j]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t(&frag)[TL][2][4] = h == 0 ? frag_a : frag_b;
#pragma unroll
      for (int j = 0; j < TL; ++j)
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          pair_table.Fragment(v[j][2 * h + s], frag[j][s]);
          frag[j][s][0] = MmaType<T>::Mul(frag[j][s][0], se[j]);
          frag[j][s][1] = MmaType<T>::Mul(frag[j][s][1], so[j]);
          frag[j][s][2] = MmaType<T>::Mul(frag[j][s][2], se[j]);
          frag[j][s][3] = MmaType<T>::Mul(frag[j][s][3], so[j]);
        }
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int j = 0; j < TL; ++j)
          WgmmaRs<T, kTokens>(acc[j], frag[j][s],
                             WgmmaDescriptorSw128(slot_base + 32 * (2 * h + s)));
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      // The half before this one has finished: its fragment set may be rewritten, and after
      // the first half, the previous stage's slot is no longer read.
      asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
      if (h == 0 && i > 0)
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(empty((i - 1) % kStages))
                     : "memory");
    }
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");

  // acc[j][4 c + e] is (row 2 pair[j], token 8 c + 2 t + e), acc[j][4 c + 2 + e] its odd row.
  const int64_t m_base = int64_t(mt) * kTokens;
  auto store = [&](int j, int c, int e, float even, float odd) {
    const int64_t m = m_base + 8 * c + 2 * t + e;
    if (pair[j] >= a.pairs || m >= a.m_total) return;
    const int64_t at = (grp * a.m_total + m) * N + 2 * pair[j];
    if (a.k_splits == 1 || a.cluster)
      *reinterpret_cast<uint32_t*>(static_cast<T*>(a.out) + at) = MmaType<T>::Pack(even, odd);
    else
      *reinterpret_cast<float2*>(a.partial + ks * a.groups * a.m_total * N + at) =
          make_float2(even, odd);
  };
  if (TL == 2 || !a.cluster) {  // (TL = 2 CTAs are never a cluster: PlanWgmma)
#pragma unroll
    for (int j = 0; j < TL; ++j)
#pragma unroll
      for (int c = 0; c < kTokens / 8; ++c)
#pragma unroll
        for (int e = 0; e < 2; ++e) store(j, c, e, acc[j][4 * c + e], acc[j][4 * c + 2 + e]);
    return;
  }
  // K split over a cluster (TL = 1): the CTA of cluster rank r adds up and stores the token
  // groups c (tokens 8 c .. 8 c + 7) with c % k_splits == r. Once every CTA of the cluster is
  // past its ring (first barrier), each writes acc[0][4 c .. 4 c + 3] of every group into the
  // ring of the group's owner, 16 bytes per consumer thread at slot (rank, c / k_splits); after
  // the second barrier an owner reads only its own shared memory and adds in rank order
  // (deterministic). Remote stores, not loads: no thread waits on distributed shared memory's
  // latency. (Correct for clusters up to 8, GPU-tested so; PlanWgmma forms clusters of 2 only.)
  if constexpr (TL == 1) {
    const int splits = a.k_splits, groups_per_owner = (kTokens / 8 + splits - 1) / splits;
    static_assert((kTokens / 8 + 7) * 256 * 16 <= kStages * Shape::kSlotBytes,
                  "the ring holds k_splits x groups_per_owner slots of 256 x 16 bytes");
    auto slot = [&](int rank, int u) { return (rank * groups_per_owner + u) * 256 + ct; };
    cooperative_groups::this_cluster().sync();
    int owner = 0, u = 0;
#pragma unroll
    for (int c = 0; c < kTokens / 8; ++c) {
      uint32_t address;
      asm("mapa.shared::cluster.u32 %0, %1, %2;"
          : "=r"(address)
          : "r"(base + 16 * slot(ks, u)), "r"(owner));
      asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(address),
                   "f"(acc[0][4 * c]), "f"(acc[0][4 * c + 1]), "f"(acc[0][4 * c + 2]),
                   "f"(acc[0][4 * c + 3])
                   : "memory");
      if (++owner == splits) owner = 0, ++u;
    }
    cooperative_groups::this_cluster().sync();
    const float4* ring = reinterpret_cast<const float4*>(dynamic_shared + (base - raw_base));
    for (int c = ks, u = 0; c < kTokens / 8; c += splits, ++u) {
      float4 sum = ring[slot(0, u)];
      for (int r = 1; r < splits; ++r) {
        const float4 v = ring[slot(r, u)];
        sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
      }
      store(0, c, 0, sum.x, sum.z);
      store(0, c, 1, sum.y, sum.w);
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // launched only on sm_90 from an sm_90a build (WgmmaUsable)
#endif
}

// Whether this build has the wgmma kernel for `device` (sm_90a code runs on compute capability
// 9.0 only; other builds and GPUs take the tiled kernel).
bool WgmmaUsable(int device) {
#if defined(JAX_NF4_SM90A)
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major == 9 && minor == 0;
#else
  (void)device;
  return false;
#endif
}

// The wgmma kernel's grid: the CTA shape (WgShape) and the K split (ChooseKSplit, one stage per
// 64-element span).
struct WgPlan {
  int tiles = 0, tokens = 0;  // TL, N
  int row_blocks = 0, m_tiles = 0, k_splits = 1, stages_per_split = 0;
  bool cluster = false;       // the K splits of a tile are one cluster (else float32 partials)
  int64_t partial_bytes = 0;  // scratch for the partials
};

WgPlan PlanWgmma(int64_t groups, int64_t m_total, int64_t pairs, int64_t cols, int sms) {
  WgPlan plan;
  auto tile = [&](int tiles, int tokens) {
    plan.tiles = tiles;
    plan.tokens = tokens;
    plan.row_blocks = int((pairs + 64 * tiles - 1) / (64 * tiles));
    plan.m_tiles = int((m_total + tokens - 1) / tokens);
    return groups * plan.row_blocks * plan.m_tiles;
  };
  int64_t ctas = m_total > 128 ? tile(1, 256) : tile(2, 128);
  if (m_total <= 128 && ctas < sms / 2) ctas = tile(1, 128);
  // K split in two over a cluster (the exchange of up to 128 KB of accumulators through shared
  // memory costs about 3 stages), or in more parts whose float32 partial sums (up to 128 KB
  // per CTA) cost about 6 stages (~3.5 stages' shared-memory fill, twice over: written, then
  // read by the sum kernel). Clusters of 4 measured slower than partials (4096^2 at M = 128:
  // 30.7 against 17.6 µs), clusters of 2 faster (M = 512: 31.9 against 39.5). (2, 128) CTAs
  // are never a cluster (with the exchange in their epilogue the kernel spills): split in
  // two, they write partials too.
  const int64_t steps = cols / 64;
  const KSplit pair = ChooseKSplit(ctas, sms, steps, 1, plan.tiles == 1 ? 3 : 6, 2);
  const KSplit many = ChooseKSplit(ctas, sms, steps, 1, 6, 16);
  const KSplit split = many.splits > 2 && many.cost < pair.cost ? many : pair;
  plan.k_splits = split.splits;
  plan.stages_per_split = int(split.per);
  plan.cluster = split.splits == 2 && plan.tiles == 1;
  if (plan.k_splits > 1 && !plan.cluster)
    plan.partial_bytes = int64_t(plan.k_splits) * groups * m_total * 2 * pairs * 4;
  return plan;
}

// cuTensorMapEncodeTiled from the driver (the runtime's entry-point query: no libcuda link).
PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A 3-D tensor map over [groups, rows, cols] elements of `bytes` each, boxes of box_rows x 64.
cudaError_t EncodeTensorMap3d(CUtensorMap* map, const void* data, int bytes, int64_t groups,
                              int64_t rows, int64_t cols, int box_rows, bool swizzle128) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = TensorMapEncoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {cuuint64_t(cols), cuuint64_t(rows), cuuint64_t(groups)};
  const cuuint64_t strides[2] = {cuuint64_t(cols * bytes), cuuint64_t(rows * cols * bytes)};
  const cuuint32_t box[3] = {64, cuuint32_t(box_rows), 1}, element_strides[3] = {1, 1, 1};
  const CUresult r = encode(
      map, bytes == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_UINT16, 3,
      const_cast<void*>(data), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      swizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Sets the wgmma kernel's shared-memory size on `device`, once per device and process.
template <typename T, typename Scales, int TL, int MT>
cudaError_t PrepareGemmWgmma(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> prepared[kMaxDevices];
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && prepared[device].load(std::memory_order_relaxed)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(GemmWgmmaKernel<T, Scales, TL, MT>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               WgShape<TL, MT>::kSharedBytes);
  if (err == cudaSuccess && cached) prepared[device].store(true, std::memory_order_relaxed);
  return err;
}

template <typename T, typename Scales, int TL, int MT>
cudaError_t LaunchGemmWgmmaShape(const TileArgs<Scales>& args, const WgPlan& plan, int device,
                                 cudaStream_t stream) {
  using Shape = WgShape<TL, MT>;
  if (cudaError_t err = PrepareGemmWgmma<T, Scales, TL, MT>(device); err != cudaSuccess)
    return err;
  CUtensorMap x_map, w_map;
  const WgArgs<Scales> a{args.scales, args.out, args.partial, args.groups, args.m_total,
                         args.pairs, args.cols, plan.row_blocks, plan.m_tiles, plan.k_splits,
                         plan.stages_per_split, args.block_shift, plan.cluster};
  if (cudaError_t err = EncodeTensorMap3d(&x_map, args.x, 2, a.groups, a.m_total, a.cols,
                                          Shape::kTokens, true);
      err != cudaSuccess)
    return err;
  if (cudaError_t err = EncodeTensorMap3d(&w_map, args.packed, 1, a.groups, a.pairs, a.cols,
                                          Shape::kPairs, false);
      err != cudaSuccess)
    return err;
  // A tile's K splits: one cluster, or CTAs of their own and the sum kernel after them.
  const cudaError_t err = LaunchKernel(
      GemmWgmmaKernel<T, Scales, TL, MT>,
      dim3(unsigned(a.groups * plan.row_blocks * plan.m_tiles * plan.k_splits)), dim3(kWgThreads),
      Shape::kSharedBytes, stream, plan.cluster ? unsigned(plan.k_splits) : 0u, x_map, w_map, a);
  if (err != cudaSuccess || a.k_splits == 1 || a.cluster) return err;
  return LaunchSumKSplits<T>(a.partial, a.out, a.groups * a.m_total * 2 * a.pairs, a.k_splits,
                             stream);
}

template <typename T, typename Scales>
cudaError_t LaunchGemmWgmma(const TileArgs<Scales>& a, const WgPlan& plan, int device,
                            cudaStream_t stream) {
  if (plan.tiles == 2) return LaunchGemmWgmmaShape<T, Scales, 2, 128>(a, plan, device, stream);
  return plan.tokens == 256 ? LaunchGemmWgmmaShape<T, Scales, 1, 256>(a, plan, device, stream)
                            : LaunchGemmWgmmaShape<T, Scales, 1, 128>(a, plan, device, stream);
}

// ---------------------------------------------------------------- dequantize

// One thread per V-byte chunk of one row pair: 2V outputs, V x sizeof(T) bytes to each row (16
// where the block size allows, so that a warp's store writes 512 contiguous bytes). I: the
// index type, 32-bit where the chunks and the grid's stride fit (cheaper divisions).
template <typename T, int V, typename I, typename Scales>
__global__ void __launch_bounds__(kThreads) DequantizeKernel(const uint8_t* packed, Scales scales,
                                                             T* out, int64_t groups,
                                                             int64_t pairs, int64_t cols,
                                                             int64_t block_size) {
  __shared__ SharedCodebook codebook;
  codebook.Fill();
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const I chunks = I(cols / V), pairs_i = I(pairs);
  const int64_t blocks = cols / block_size;
  const I total = I(groups * pairs * (cols / V));
  for (I t = I(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += I(gridDim.x) * blockDim.x) {
    const I row_pair = t / chunks;  // g * pairs + pair
    const I g = row_pair / pairs_i, pair = row_pair - g * pairs_i;
    const int64_t k0 = int64_t(t - row_pair * chunks) * V;
    const Vec<uint8_t, V> w = LoadPacked<V>(packed + int64_t(row_pair) * cols + k0);
    const float s0 = scales.RowOf(g, 2 * pair, 2 * pairs, blocks)(k0 / block_size);
    const float s1 = scales.RowOf(g, 2 * pair + 1, 2 * pairs, blocks)(k0 / block_size);
    Vec<T, V> even, odd;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      even.v[i] = FromFloat<T>(codebook(EvenRowCode(w.v[i]), lane) * s0);
      odd.v[i] = FromFloat<T>(codebook(OddRowCode(w.v[i]), lane) * s1);
    }
    StoreVec<T, V>(out + (2 * int64_t(row_pair)) * cols + k0, even);
    StoreVec<T, V>(out + (2 * int64_t(row_pair) + 1) * cols + k0, odd);
  }
}

// ---------------------------------------------------------------- quantize

// One warp per (row pair, block): NaN-propagating absmax of both rows, then codes packed
// two rows a byte. Lanes stride the block, so stores of one warp are coalesced.
template <typename T>
__global__ void __launch_bounds__(kThreads) QuantizeKernel(const T* w, uint8_t* packed,
                                                           float* absmax, int64_t groups,
                                                           int64_t pairs, int64_t cols,
                                                           int64_t block_size) {
  const int lane = threadIdx.x % 32;
  const int64_t blocks = cols / block_size;
  const int64_t total = groups * pairs * blocks;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t t = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; t < total; t += warps) {
    const int64_t row_pair = t / blocks, b = t % blocks;
    const T* even = w + (2 * row_pair) * cols + b * block_size;
    const T* odd = even + cols;
    float m0 = 0.0f, m1 = 0.0f;
    for (int64_t i = lane; i < block_size; i += 32) {
      m0 = AbsMaxUpdate(m0, ToFloat(even[i]));
      m1 = AbsMaxUpdate(m1, ToFloat(odd[i]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      m0 = AbsMaxUpdate(m0, __shfl_xor_sync(0xffffffffu, m0, off));
      m1 = AbsMaxUpdate(m1, __shfl_xor_sync(0xffffffffu, m1, off));
    }
    const float inv0 = InverseScale(m0), inv1 = InverseScale(m1);
    uint8_t* dst = packed + row_pair * cols + b * block_size;
    for (int64_t i = lane; i < block_size; i += 32)
      dst[i] = PackPair(QuantizeElement(ToFloat(even[i]), m0, inv0),
                        QuantizeElement(ToFloat(odd[i]), m1, inv1));
    if (lane == 0) {
      absmax[(2 * row_pair) * blocks + b] = m0;
      absmax[(2 * row_pair + 1) * blocks + b] = m1;
    }
  }
}

// Quantize with 16-byte accesses: one thread per (row pair, 16 columns), the L = block_size / 16
// threads of a block adjacent in a warp (L a power of two <= 32) and combining their absmax by
// shuffles; each thread loads 16 elements of both rows and stores 16 packed bytes at once.
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) QuantizeChunkKernel(const T* w, uint8_t* packed,
                                                                float* absmax, int64_t groups,
                                                                int64_t pairs, int64_t cols,
                                                                int64_t block_size) {
  const int64_t chunks = cols / 16, blocks = cols / block_size;
  const int64_t total = groups * pairs * chunks;  // a multiple of L
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  // Warp-uniform trip count: every lane reaches the shuffles.
  for (int64_t base = blockIdx.x * int64_t(blockDim.x) + (threadIdx.x & ~31); base < total;
       base += stride) {
    const int64_t t = base + threadIdx.x % 32;
    const bool active = t < total;
    const int64_t row_pair = active ? t / chunks : 0, c = active ? t % chunks : 0;
    const T* even = w + (2 * row_pair) * cols + 16 * c;
    Vec<T, 16> ev = LoadVec<T, 16>(even), od = LoadVec<T, 16>(even + cols);
    float m0 = 0.0f, m1 = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      m0 = AbsMaxUpdate(m0, ToFloat(ev.v[i]));
      m1 = AbsMaxUpdate(m1, ToFloat(od.v[i]));
    }
#pragma unroll
    for (int off = 1; off < L; off <<= 1) {
      m0 = AbsMaxUpdate(m0, __shfl_xor_sync(0xffffffffu, m0, off));
      m1 = AbsMaxUpdate(m1, __shfl_xor_sync(0xffffffffu, m1, off));
    }
    if (!active) continue;
    const float inv0 = InverseScale(m0), inv1 = InverseScale(m1);
    Vec<uint8_t, 16> out;
#pragma unroll
    for (int i = 0; i < 16; ++i)
      out.v[i] = PackPair(QuantizeElement(ToFloat(ev.v[i]), m0, inv0),
                          QuantizeElement(ToFloat(od.v[i]), m1, inv1));
    *reinterpret_cast<uint4*>(packed + row_pair * cols + 16 * c) =
        *reinterpret_cast<const uint4*>(&out);
    if (c % L == 0) {
      const int64_t b = c / L;
      absmax[(2 * row_pair) * blocks + b] = m0;
      absmax[(2 * row_pair + 1) * blocks + b] = m1;
    }
  }
}

// ---------------------------------------------------------------- handlers

ffi::Error LaunchError(const char* op, cudaError_t err) {
  return ffi::Error::Internal(std::string(op) + ": CUDA launch failed: " +
                              cudaGetErrorString(err));
}

ffi::Error QuantizeCuda(cudaStream_t stream, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> packed,
                        ffi::Result<ffi::AnyBuffer> absmax, int64_t block_size) {
  Nf4Dims d;
  if (auto e = CheckQuantizeInput(w, block_size, &d); e.failure()) return e;
  if (auto e = CheckPacked("nf4_quantize", *packed, block_size, &d); e.failure()) return e;
  if (auto e = CheckAbsmax("nf4_quantize", *absmax, d); e.failure()) return e;
  if (d.groups * d.rows * d.cols == 0) return ffi::Error::Success();
  const int64_t pairs = d.rows / 2;
  cudaError_t err = DispatchActivation(w.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(w.untyped_data());
    uint8_t* dst = static_cast<uint8_t*>(packed->untyped_data());
    float* scales = static_cast<float*>(absmax->untyped_data());
    auto chunked = [&](auto kernel) {
      kernel<<<GridFor(d.groups * pairs * (d.cols / 16), kThreads), kThreads, 0, stream>>>(
          src, dst, scales, d.groups, pairs, d.cols, d.block_size);
      return cudaGetLastError();
    };
    switch (d.block_size) {  // 16-byte path: block_size / 16 threads per block, a power of two
      case 32: return chunked(QuantizeChunkKernel<T, 2>);
      case 64: return chunked(QuantizeChunkKernel<T, 4>);
      case 128: return chunked(QuantizeChunkKernel<T, 8>);
      case 256: return chunked(QuantizeChunkKernel<T, 16>);
      case 512: return chunked(QuantizeChunkKernel<T, 32>);
      default:
        QuantizeKernel<T><<<GridFor(d.groups * pairs * d.blocks(), kWarps), kThreads, 0, stream>>>(
            src, dst, scales, d.groups, pairs, d.cols, d.block_size);
        return cudaGetLastError();
    }
  });
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_quantize", err);
}

template <typename Scales>
ffi::Error Dequantize(cudaStream_t stream, ffi::AnyBuffer packed, const Scales& scales,
                      const Nf4Dims& d, ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = CheckDense("nf4_dequantize", "output", *out, d); e.failure()) return e;
  if (d.groups * d.rows * d.cols == 0) return ffi::Error::Success();
  const int64_t pairs = d.rows / 2;
  cudaError_t err = DispatchActivation(out->element_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kStoreV = 16 / sizeof(T);  // packed bytes per thread for 16-byte stores
    auto launch = [&](auto v_tag) {
      constexpr int V = decltype(v_tag)::value;
      const int64_t work = d.groups * pairs * (d.cols / V);
      // 32-bit indices while the last index plus the grid's stride (< 2^24) stays below 2^32
      auto kernel = work < (int64_t(1) << 31) ? DequantizeKernel<T, V, uint32_t, Scales>
                                              : DequantizeKernel<T, V, int64_t, Scales>;
      kernel<<<GridFor(work, kThreads), kThreads, 0, stream>>>(
          static_cast<const uint8_t*>(packed.untyped_data()), scales,
          static_cast<T*>(out->untyped_data()), d.groups, pairs, d.cols, d.block_size);
      return cudaGetLastError();
    };
    return d.block_size % kStoreV == 0 ? launch(std::integral_constant<int, kStoreV>{})
                                       : launch(std::integral_constant<int, 1>{});
  });
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_dequantize", err);
}

// Scratch for a tiled or wgmma launch's split-K partial sums (none where bytes == 0).
ffi::Error AllocatePartialSums(ffi::ScratchAllocator& scratch, int64_t bytes, float** partial) {
  if (bytes == 0) return ffi::Error::Success();
  auto buffer = scratch.Allocate(bytes, 16);
  if (!buffer.has_value())
    return ffi::Error::Internal("nf4_matmul: could not allocate " + std::to_string(bytes) +
                                " bytes of scratch for the split-K partial sums");
  *partial = static_cast<float*>(*buffer);
  return ffi::Error::Success();
}

template <typename Scales>
ffi::Error Matmul(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer x,
                  ffi::AnyBuffer packed, const Scales& scales, const Nf4Dims& d,
                  ffi::Result<ffi::AnyBuffer> out) {
  int64_t m_rows = 0;
  if (auto e = CheckMatmul(x, *out, d, &m_rows); e.failure()) return e;
  if (d.groups * m_rows * d.rows == 0) return ffi::Error::Success();
  if (d.cols == 0) {  // empty contraction: the product is zero
    cudaError_t err = cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream);
    return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_matmul", err);
  }
  const int block_shift = Log2IfPowerOfTwo(d.block_size);
  const bool tensor_cores = x.element_type() != ffi::DataType::F32 &&
                            d.block_size % kTcSpan == 0 && block_shift >= 0;
  int sms = 0, optin = 0, device = 0;  // what the tensor-core kernels are sized by
  if (tensor_cores) {
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  // The tiled and wgmma kernels' operands (their grids are set at launch).
  TileArgs<Scales> tile{};
  tile.x = x.untyped_data();
  tile.packed = static_cast<const uint8_t*>(packed.untyped_data());
  tile.scales = scales;
  tile.out = out->untyped_data();
  tile.groups = d.groups;
  tile.m_total = m_rows;
  tile.pairs = d.rows / 2;
  tile.cols = d.cols;
  tile.block_shift = block_shift;
  if (tensor_cores && m_rows > kWgMinRows && WgmmaUsable(device)) {
    const WgPlan plan = PlanWgmma(d.groups, m_rows, d.rows / 2, d.cols, sms);
    if (auto e = AllocatePartialSums(scratch, plan.partial_bytes, &tile.partial); e.failure())
      return e;
    cudaError_t err = DispatchActivation(x.element_type(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, float>) return cudaErrorInvalidValue;  // not reached
      else return LaunchGemmWgmma<T>(tile, plan, device, stream);
    });
    return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_matmul", err);
  }
  const int tile_nt = tensor_cores && m_rows > kMaxFusedRows ? ChooseTileNt(m_rows, optin) : 0;
  if (tile_nt > 0) {
    int ctas_per_sm = 0;
    cudaError_t err = DispatchActivation(x.element_type(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, float>) return cudaErrorInvalidValue;  // not reached
      else return DispatchTileNt(tile_nt, [&](auto nt) {
        return PrepareGemmTile<T, decltype(nt)::value, Scales>(device, &ctas_per_sm);
      });
    });
    if (err != cudaSuccess) return LaunchError("nf4_matmul", err);
    const TilePlan plan = PlanGemmTile(tile_nt, d.groups, m_rows, d.rows / 2, d.cols,
                                       int64_t(sms) * (ctas_per_sm > 0 ? ctas_per_sm : 1));
    if (auto e = AllocatePartialSums(scratch, plan.partial_bytes, &tile.partial); e.failure())
      return e;
    err = DispatchActivation(x.element_type(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, float>) return cudaErrorInvalidValue;  // not reached
      else return LaunchGemmTile<T>(tile, plan, stream);
    });
    return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_matmul", err);
  }
  GemvArgs<Scales> a{};
  a.x = x.untyped_data();
  a.packed = static_cast<const uint8_t*>(packed.untyped_data());
  a.scales = scales;
  a.out = out->untyped_data();
  a.m_total = m_rows;
  a.pairs = d.rows / 2;
  a.cols = d.cols;
  a.block_size = d.block_size;
  a.block_shift = block_shift;
  cudaError_t err = DispatchActivation(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (tensor_cores)
        return LaunchGemvTensorCore<T>(a, d.groups, sms, optin >= kBpSharedBytes<2>, stream);
    }
    return d.block_size % 16 == 0 ? LaunchGemv<T, 16>(a, d.groups, stream)
                                  : LaunchGemv<T, 1>(a, d.groups, stream);
  });
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_matmul", err);
}

ffi::Error DequantizeCuda(cudaStream_t stream, ffi::AnyBuffer packed, ffi::AnyBuffer absmax,
                          ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  return WithWeight("nf4_dequantize", packed, block_size, absmax,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Dequantize(stream, packed, scales, d, out);
                    });
}

ffi::Error DequantizeDqCuda(cudaStream_t stream, ffi::AnyBuffer packed, ffi::AnyBuffer codes,
                            ffi::AnyBuffer nested, ffi::AnyBuffer table, ffi::AnyBuffer offset,
                            ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  return WithWeight("nf4_dequantize", packed, block_size, codes, nested, table, offset,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Dequantize(stream, packed, scales, d, out);
                    });
}

ffi::Error MatmulCuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                      ffi::AnyBuffer packed, ffi::AnyBuffer absmax, ffi::Result<ffi::AnyBuffer> out,
                      int64_t block_size) {
  return WithWeight("nf4_matmul", packed, block_size, absmax,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Matmul(stream, scratch, x, packed, scales, d, out);
                    });
}

ffi::Error MatmulDqCuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                        ffi::AnyBuffer packed, ffi::AnyBuffer codes, ffi::AnyBuffer nested,
                        ffi::AnyBuffer table, ffi::AnyBuffer offset,
                        ffi::Result<ffi::AnyBuffer> out,
                        int64_t block_size) {
  return WithWeight("nf4_matmul", packed, block_size, codes, nested, table, offset,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Matmul(stream, scratch, x, packed, scales, d, out);
                    });
}

}  // namespace

bool HasWgmmaKernel() {
#if defined(JAX_NF4_SM90A)
  return true;
#else
  return false;
#endif
}

}  // namespace jax_nf4

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4QuantizeCuda, jax_nf4::QuantizeCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Ret<ffi::AnyBuffer>()  // packed
                                  .Ret<ffi::AnyBuffer>()  // absmax
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4DequantizeCuda, jax_nf4::DequantizeCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // packed
                                  .Arg<ffi::AnyBuffer>()  // absmax
                                  .Ret<ffi::AnyBuffer>()  // w
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4DequantizeDqCuda, jax_nf4::DequantizeDqCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // packed
                                  .Arg<ffi::AnyBuffer>()  // absmax codes
                                  .Arg<ffi::AnyBuffer>()  // nested_absmax
                                  .Arg<ffi::AnyBuffer>()  // table
                                  .Arg<ffi::AnyBuffer>()  // offset
                                  .Ret<ffi::AnyBuffer>()  // w
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4MatmulDqCuda, jax_nf4::MatmulDqCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // packed
                                  .Arg<ffi::AnyBuffer>()  // absmax codes
                                  .Arg<ffi::AnyBuffer>()  // nested_absmax
                                  .Arg<ffi::AnyBuffer>()  // table
                                  .Arg<ffi::AnyBuffer>()  // offset
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4MatmulCuda, jax_nf4::MatmulCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // packed
                                  .Arg<ffi::AnyBuffer>()  // absmax
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});
