// The fused dequant + GEMV kernels for up to kMaxFusedRows activation rows (decode and batched
// decode): SIMT kernels for any dtype and block size, and for 16-bit activations the
// tensor-core kernels (the byte-pair kernel where a CTA can have its 64 KB table, else the
// 16-row-tile GEMV).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_matmul.h"
#include "nf4_scales.h"

namespace jax_nf4 {
namespace {

// ---------------------------------------------------------------- fused GEMV

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
cudaError_t LaunchGemvSimt(GemvArgs<Scales> a, int64_t groups, cudaStream_t stream) {
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

constexpr int kTcUnroll = 4;   // steps whose loads are issued together

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

// How the byte-pair kernel reads the scales: one read per span (any scales); plain scales of
// 64-element blocks with an even count per row in aligned pairs (see `load`); double-quant
// scales with one group (no vmap batch) through a copy of their 256-entry table in shared
// memory, made once per CTA (read by LDS with a 32-bit address, see `compute`); the same where
// a row's blocks lie in one 256-block nested group (K / block_size divides 256), its nested
// scale read once per unit; and both of those through a lane-replicated copy of the table in
// the pair table's unused upper half (kLaneTable*: the codes of four spans in one read, one PRMT
// makes the LDS address, see `lookup_scale`), for launches where a CTA runs many spans.
enum class BpScaleRead {
  kPerSpan, kPairs, kSharedTable, kSharedTableRowNested, kLaneTable, kLaneTableRowNested
};

// The weights' streaming load (evict-first) with L2's 128-byte prefetch-size hint: L2 fetches the
// aligned 128 bytes holding the 64 a quad reads of a byte row, so an even span brings the next
// (0.2 - 1.4% faster on every benchmark shape, H100; the 256-byte hint is 2 - 10% slower).
// Volatile, so that the compiler keeps the loads after the table lookups before them in program
// order (the byte-pair kernel's late issue, below; the other kernels' code is the same either way).
__device__ __forceinline__ uint4 LoadWeights(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.cs.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
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
  constexpr bool kLaneTable = kScaleRead == BpScaleRead::kLaneTable ||
                              kScaleRead == BpScaleRead::kLaneTableRowNested;
  constexpr bool kRowNested = kScaleRead == BpScaleRead::kSharedTableRowNested ||
                              kScaleRead == BpScaleRead::kLaneTableRowNested;
  constexpr bool kSharedTable =
      kScaleRead == BpScaleRead::kSharedTable || kScaleRead == BpScaleRead::kSharedTableRowNested;
  // Where the ring's next group is issued. ptxas puts every weight load of the ring on one
  // scoreboard, so the compute's first use of a group waits for all weight loads in flight: issued
  // before that wait (kIssueLate false), the next group's full latency is exposed each time;
  // issued after the group's first table lookups (true), the wait covers only the group issued
  // one compute earlier (session 26, H100, kernel µs at M = 1: plain 28672x8192 53.1 ->
  // 50.9, 8192^2 17.7 -> 17.0; at M = 5 - 8 it lost 2 - 3%). The double-quant kernels take it
  // with the lane-replicated table, their table staged before the loop, after step 4: in their
  // SASS the activation wait comes after the group's, so at step 0 it would cover the next
  // group's loads (session 27: 28672x8192 53.5 -> 52.0, 14336x4096 17.7 -> 17.4, 8192^2 18.5 ->
  // 18.3). With the shared table (CTAs of fewer than kBpLaneTableMinSpans spans) the table's
  // staging before the loop delays the first groups: 4096^2 7.1 -> 7.7, not taken.
  // kIssuePoint: the issue comes after mma step st's lookups (2 st) or after its mma (2 st + 1).
  constexpr bool kIssueLate = NT == 1 && (std::is_same_v<Scales, PlainScales> || kLaneTable);
  constexpr int kIssuePoint = std::is_same_v<Scales, PlainScales> ? 0 : 2 * 4 + 1;
  constexpr bool kPairedScales = kScaleRead == BpScaleRead::kPairs || kLaneTable;
  static_assert(kScaleRead != BpScaleRead::kPairs || std::is_same_v<Scales, PlainScales>);
  static_assert(!(kSharedTable || kLaneTable) || std::is_same_v<Scales, DoubleQuantScales>);
  // Thread i's entry of the double-quant table (kSharedTable, kLaneTable), read first.
  float scale_table_entry = 0.0f;
  if constexpr (kSharedTable || kLaneTable) {
    if (threadIdx.x < 256) scale_table_entry = __ldg(a.scales.table + threadIdx.x);
  }
  const uint32_t scale_table_base = table_base + 65536;
  // The tables are filled in kFillRounds rounds of one 16-byte store per thread; in round c
  // thread i writes chunk i % 8 of entry i / 8 + c * 32 W / 8 (8 threads per 128-byte row: no
  // bank conflicts).
  constexpr int kFillRounds = 256 * 8 / (32 * W);
  static_assert(kFillRounds * 32 * W == 256 * 8, "every thread fills the same chunk count");
  const uint32_t lane_address = table_base | (4 * (threadIdx.x % 32));
  auto lookup = [lane_address](uint32_t word, int byte) {  // table entry of one code byte
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];"
                 : "=r"(v)
                 : "r"(__byte_perm(word, lane_address, 0x7604 | (byte << 4))));
    return v;
  };
  // kLaneTable: the double-quant table sits in the pair table's unused upper half, entry e at
  // 256 e + 128 + 4 l for every lane l, so one PRMT of a code word gives a lane its entry's
  // conflict-free address (as `lookup` does for the pair table).
  auto lookup_scale = [lane_address](uint32_t word, int byte) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];"
                 : "=f"(v)
                 : "r"(__byte_perm(word, lane_address | 128u, 0x7604 | (byte << 4))));
    return v;
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int splits = a.splits;
  // splits is a power of two (LaunchGemvBytePair) and block_size a power of two >= 64: shifts
  // and masks instead of integer divisions in every thread's prologue.
  const int split_shift = __ffs(splits) - 1;
  const int split = warp & (splits - 1);
  const int64_t K = a.cols, N = 2 * a.pairs, blocks = K >> a.block_shift;
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
  // Unit `unit`'s operands for this lane; with read_scales, also its scale row and, with
  // kRowNested, the rows' nested scale (a read from memory), else the caller fills them.
  auto setup = [&](int64_t unit, bool read_scales = true) {
    Unit u;
    // No division without a vmap batch; else 32-bit (units, 16 row pairs each, are < 2^32).
    const uint32_t per_group = uint32_t(a.ctas_per_group);
    u.grp = a.groups == 1 ? 0 : uint32_t(unit) / per_group;
    const int64_t cta = uint32_t(unit) - uint32_t(u.grp) * per_group;
    u.tile = (cta * (W >> split_shift) + (warp >> split_shift)) * 16;
    const int64_t pa = u.tile + g, pb = pa + 8;
    const int64_t ra = pa < a.pairs ? pa : 0, rb = pb < a.pairs ? pb : 0;
    const uint8_t* w0 = a.packed + u.grp * a.pairs * K + 16 * t;
    u.wa = reinterpret_cast<const uint4*>(w0 + ra * K) + 4 * begin;
    u.wb = reinterpret_cast<const uint4*>(w0 + rb * K) + 4 * begin;
    u.x = reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) +
                                         (u.grp * a.m_total + a.m0) * K + 16 * t) + 8 * begin;
    if (read_scales) {
      u.scale = a.scales.RowOf(u.grp, t < 2 ? 2 * ra + t : 2 * rb + t - 2, N, blocks);
      // The row's blocks all lie in the nested group of its block 0 (K / block_size divides 256).
      if constexpr (kRowNested) u.nested = __ldg(u.scale.nested);
    }
    return u;
  };

  struct Group {
    uint4 w[U][2];
    typename ScaleRow::Raw scale[U];  // decoded in compute, once the reads have landed
  };
  // kLaneTable: the codes of a ring pass's U R spans are read by its first group (slot 0) and
  // handed to the others after slot 0's compute (hand_over, below).
  constexpr int kPassSpans = U * R;
  static_assert(!kLaneTable || kPassSpans == 4, "double-quant codes are read in 4-span passes");
  // Loads the group at span s (offset o spans from the unit's pointers) into ring slot `slot`.
  // Plain scales with kPairs (64-element blocks, an even block count per row: every pair
  // aligned): the scales of spans (s + u, s + u + 1), s + u even, come in one 8-byte read, which
  // takes one of the 32 scale lines a warp's read touches (its lanes read 32 rows) off the L1
  // per span: 3 - 6% of the kernel time (bench/NOTES.md, session 8). kLaneTable (a block count
  // per row divisible by 4): the codes of a ring pass's 4 spans in one 4-byte read by slot 0
  // (session 27, H100: 28672x8192 dq 1.2 - 2% faster than pairs at M = 1 and 8; the same pass
  // read of plain scales, 16 bytes, was 3 - 11% slower than pairs). The reads have no branch (a
  // guarded one measured no faster than v17): pairs or passes past the slice's end, and the
  // empty slices of the last splits, read the one ending at `end` (a multiple of 4 there:
  // slices start at multiples of 4, and K / 64 is even or, with kLaneTable, divisible by 4).
  const int last_pair = end - 2, last_pass = end - kPassSpans;
  auto load = [&](Group& gr, const Unit& un, int s, int o, int slot) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s + u >= end) break;
      gr.w[u][0] = LoadWeights(un.wa + 4 * (o + u));
      gr.w[u][1] = LoadWeights(un.wb + 4 * (o + u));
      if constexpr (!kPairedScales) gr.scale[u] = un.scale.Fetch((s + u) >> step_shift);
    }
    if constexpr (kLaneTable) {
      if (slot == 0) {
        // The four spans' codes as bytes 0 - 3 of one word: one 4-byte read (64-element
        // blocks), or the codes of spans b and b + 2 twice each (larger blocks).
        const int b = s < last_pass ? s : last_pass;
        gr.scale[0] = step_shift == 0
                          ? __ldg(reinterpret_cast<const unsigned*>(un.scale.codes + b))
                          : uint32_t(__ldg(un.scale.codes + (b >> step_shift))) * 0x101u |
                                uint32_t(__ldg(un.scale.codes + ((b + 2) >> step_shift))) *
                                    0x1010000u;
      }
    } else if constexpr (kPairedScales) {
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
  // after_first_use: with kIssueLate, the next group's issue, called once per group (at span 0's
  // kIssuePoint, or at once where the group has no span in the slice).
  auto compute = [&](const Group& gr, const Unit& un, int s, int o, auto&& after_first_use) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s + u >= end) {
        if constexpr (kIssueLate) {
          if (u == 0) after_first_use();
        }
        break;
      }
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
        if constexpr (kIssueLate) {
          if (u == 0 && 2 * st == kIssuePoint) after_first_use();
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t xw = reinterpret_cast<const uint32_t*>(&xs[j][0])[st];
          MmaType<T>::Mma(part[j], frag, __byte_perm(xw, 0, sel_lo), __byte_perm(xw, 0, sel_hi));
        }
        if constexpr (kIssueLate) {
          if (u == 0 && 2 * st + 1 == kIssuePoint) after_first_use();
        }
      }
      const int blk = (s + u) >> step_shift;
      float scale;
      if constexpr (kLaneTable) {
        const float entry = lookup_scale(uint32_t(gr.scale[u & ~1]), u & 1);
        scale = kRowNested ? DecodeDoubleQuantScale(entry, un.nested, un.scale.offset)
                           : un.scale.DecodeWith(entry, blk);
      } else {
        scale = kSharedTable ? DecodeStagedScale(un.scale, gr.scale[u], blk, scale_table_base,
                                                 kRowNested, un.nested)
                             : un.scale.Decode(gr.scale[u], blk);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float sc = __shfl_sync(0xffffffffu, scale, c, 4);  // lane c of the quad
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[j][c] = fmaf(sc, part[j][c], acc[j][c]);
      }
    }
  };

  // A ring of R load groups in registers: the loads of the group R - 1 ahead go out before a
  // group is computed (with kIssueLate: after its first use, kIssuePoint), and the stream of
  // groups runs on across work units (G groups each), so the next unit's first loads are in
  // flight during this unit's split-K sum.
  const int G = a.steps_per_split / U;
  Group ring[R];
  int64_t load_unit = blockIdx.x;
  int load_group = 0;
  Unit lu = setup(blockIdx.x);
  auto issue = [&](int slot) {  // loads the load cursor's group and advances the cursor
    if (load_unit < units) load(ring[slot], lu, begin + load_group * U, load_group * U, slot);
    if (++load_group == G) {
      load_group = 0;
      load_unit += gridDim.x;
      lu = setup(load_unit < units ? load_unit : int64_t(blockIdx.x));
    }
  };
  // The first loads go out before the CTA fills and waits for its pair table.
#pragma unroll
  for (int r = 0; r < R - 1; ++r) issue(r);
#pragma unroll
  for (int c = 0; c < kFillRounds; ++c) {
    const int i = threadIdx.x + c * 32 * W, e = i / 8;
    const uint32_t v = MmaType<T>::Pack(kDeviceCodebook[e & 15], kDeviceCodebook[e >> 4]);
    reinterpret_cast<uint4*>(table)[e * 16 + i % 8] = make_uint4(v, v, v, v);
  }
  __syncthreads();
  // The double-quant table's shared copy is written after the loop's first issue (with
  // kIssueLate: before the loop, see there), behind its own barrier. Its global read (the same
  // 1 KB for every CTA of the launch) lands well after the first weights (session 25: 0.7 µs of
  // 8.0 at 4096^2, M = 1), and with one barrier for both tables the ring's next group went out
  // only after it. kLaneTable: each thread's entry goes to the 1 KB table first, then each
  // row's lane-replicated upper half is copied from there (a third barrier; holding four
  // entries per thread into the loop spilled at NT = 2).
  constexpr bool kStagedScaleTable = kSharedTable || kLaneTable;
  bool scale_table_pending = kStagedScaleTable;
  auto stage_scale_table = [&]() {
    if (threadIdx.x < 256) scale_table[threadIdx.x] = scale_table_entry;
    __syncthreads();
    if constexpr (kLaneTable) {
#pragma unroll
      for (int c = 0; c < kFillRounds; ++c) {
        const int i = threadIdx.x + c * 32 * W, e = i / 8;
        const uint32_t bits = __float_as_uint(scale_table[e]);
        reinterpret_cast<uint4*>(table)[e * 16 + 8 + i % 8] = make_uint4(bits, bits, bits, bits);
      }
      __syncthreads();
    }
    scale_table_pending = false;
  };

  // With the late issue the first group's wait comes first anyway: the table is staged before
  // the loop (its barriers at a CTA-uniform place, not inside the compute).
  if constexpr (kIssueLate && kStagedScaleTable) stage_scale_table();
  // kLaneTable: the codes of ring slots 1 .. R - 1, read by slot 0's group, handed over once
  // slot 0 is computed (its reads have landed; the other slots' previous groups are done).
  auto hand_over = [&]() {
    if constexpr (kLaneTable) {
#pragma unroll
      for (int k = 1; k < R; ++k) ring[k].scale[0] = int(uint32_t(ring[0].scale[0]) >> (8 * U * k));
    }
  };
  int parity = 0;  // the partial-sum buffer of this unit
  int64_t unit = blockIdx.x;
  // The values the setup reads from memory (double-quant offset and nested scale) come from
  // the load cursor's setup of the same unit (R - 1 < G groups ahead, the cursor is still in
  // it), read with the unit's first weight loads: the compute does not wait on its own reads.
  auto setup_compute = [&](int64_t next) {
    Unit u = setup(next < units ? next : int64_t(blockIdx.x), false);
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
        if constexpr (kIssueLate) {
          compute(ring[r], cur, begin + (group + r) * U, (group + r) * U,
                  [&]() { issue((r + R - 1) % R); });
        } else {
          issue((r + R - 1) % R);
          if (kStagedScaleTable && scale_table_pending) stage_scale_table();  // once, CTA-uniform
          compute(ring[r], cur, begin + (group + r) * U, (group + r) * U, [] {});
        }
        if (r == 0) hand_over();
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
constexpr int64_t kBpLaneTableMinSpans = 16;  // see LaunchGemvBytePair
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
    const bool row_nested = kNestedBlockSize % (a.cols / a.block_size) == 0;
    // The lane-replicated table costs 32 KB more of shared stores per CTA and saves work per
    // span: it paid where a CTA runs at least kBpLaneTableMinSpans spans (H100, M = 1 / 8:
    // 28672x8192, 7 rounds of 8 spans, 4 / 5% faster; 8192^2, one round of 16, 2 / 4%;
    // 14336x4096, one round of 16, level; 4096^2, one round of 4, 4% slower while its stores came
    // before the CTA's barrier; level since they come after the first issue, session 26). Its
    // code reads, 4 spans at once, need a span count per row (K / 64) divisible by 4.
    const int64_t spans_per_cta = (units + sms - 1) / sms * a.steps_per_split;
    const bool lane_table = spans_per_cta >= kBpLaneTableMinSpans &&
                            (a.cols / kBpSpan) % 4 == 0;
    if (lane_table)
      kernel = row_nested
                   ? GemvBytePairKernel<T, NT, U, R, Scales, BpScaleRead::kLaneTableRowNested>
                   : GemvBytePairKernel<T, NT, U, R, Scales, BpScaleRead::kLaneTable>;
    else
      kernel = row_nested
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

}  // namespace

template <typename T, typename Scales>
cudaError_t LaunchGemv(GemvArgs<Scales> a, int64_t groups, bool tensor_cores, int sms,
                       int shared_optin, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores)
      return LaunchGemvTensorCore<T>(a, groups, sms, shared_optin >= kBpSharedBytes<2>, stream);
  }
  return a.block_size % 16 == 0 ? LaunchGemvSimt<T, 16>(a, groups, stream)
                                : LaunchGemvSimt<T, 1>(a, groups, stream);
}

// Explicit instantiations: the dtypes and scale kinds the handlers call with.
template cudaError_t LaunchGemv<float, PlainScales>(
    GemvArgs<PlainScales>, int64_t, bool, int, int, cudaStream_t);
template cudaError_t LaunchGemv<float, DoubleQuantScales>(
    GemvArgs<DoubleQuantScales>, int64_t, bool, int, int, cudaStream_t);
template cudaError_t LaunchGemv<__half, PlainScales>(
    GemvArgs<PlainScales>, int64_t, bool, int, int, cudaStream_t);
template cudaError_t LaunchGemv<__half, DoubleQuantScales>(
    GemvArgs<DoubleQuantScales>, int64_t, bool, int, int, cudaStream_t);
template cudaError_t LaunchGemv<__nv_bfloat16, PlainScales>(
    GemvArgs<PlainScales>, int64_t, bool, int, int, cudaStream_t);
template cudaError_t LaunchGemv<__nv_bfloat16, DoubleQuantScales>(
    GemvArgs<DoubleQuantScales>, int64_t, bool, int, int, cudaStream_t);

}  // namespace jax_nf4
