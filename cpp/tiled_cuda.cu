// The tiled tensor-core matmul for 16-bit activations above kMaxFusedRows rows (batched
// decode, speculative decoding, prefill where the wgmma kernel is not used).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_copy.cuh"
#include "cuda_matmul.h"
#include "nf4_scales.h"

namespace jax_nf4 {
namespace {

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

// The M <= 16 tile has registers (<= 128) and shared memory (95 KB) for two CTAs per SM.
template <int NT>
constexpr int kGtMinCtasPerSm = NT == 2 ? 2 : 1;

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
        next_even[wi] = __shfl_sync(0xffffffffu, own, 2 * wi, 4);  // lanes of the quad
        next_odd[wi] = __shfl_sync(0xffffffffu, own, 2 * wi + 1, 4);
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

// Whether a launch takes the row-nested kernel: double-quant scales, K / block_size divides 256.
template <typename Scales>
bool TileRowNested(const TileArgs<Scales>& a) {
  return kIsDoubleQuant<Scales> && kNestedBlockSize % (a.cols >> a.block_shift) == 0;
}

// Sets the kernels' shared-memory size on `device` (before their first launch there) and gives
// how many of their CTAs an SM holds (the same for both forms); once per device and process
// (the attribute lasts with the device's context; the answer is kept for later calls).
template <typename T, int NT, typename Scales>
cudaError_t PrepareGemmTileNt(int device, int* ctas_per_sm) {
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

// Launches the tiled kernel (PrepareGemmTileNt has set its shared-memory size) and, with K split,
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
}  // namespace

// The n-tile count for M: the widest tile up to M (decode amortized over more rows) whose
// shared memory a CTA can have, else narrower ones (sm_80: up to 8; sm_86: 2); 0: none fits.
int ChooseTileNt(int64_t m_total, int shared_optin) {
  int nt = m_total <= 16 ? 2 : m_total <= 32 ? 4 : m_total <= 64 ? 8 : 16;
  while (nt >= 2 && shared_optin < GtSharedBytes(nt)) nt /= 2;
  return nt >= 2 ? nt : 0;
}
template <typename T, typename Scales>
cudaError_t PrepareGemmTile(int nt, int device, int* ctas_per_sm) {
  return DispatchTileNt(nt, [&](auto nt_tag) {
    return PrepareGemmTileNt<T, decltype(nt_tag)::value, Scales>(device, ctas_per_sm);
  });
}

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

// Explicit instantiations: the dtypes and scale kinds the handlers call with.
template cudaError_t PrepareGemmTile<__half, PlainScales>(
    int, int, int*);
template cudaError_t PrepareGemmTile<__half, DoubleQuantScales>(
    int, int, int*);
template cudaError_t PrepareGemmTile<__nv_bfloat16, PlainScales>(
    int, int, int*);
template cudaError_t PrepareGemmTile<__nv_bfloat16, DoubleQuantScales>(
    int, int, int*);
template cudaError_t LaunchGemmTile<__half, PlainScales>(
    TileArgs<PlainScales>, const TilePlan&, cudaStream_t);
template cudaError_t LaunchGemmTile<__half, DoubleQuantScales>(
    TileArgs<DoubleQuantScales>, const TilePlan&, cudaStream_t);
template cudaError_t LaunchGemmTile<__nv_bfloat16, PlainScales>(
    TileArgs<PlainScales>, const TilePlan&, cudaStream_t);
template cudaError_t LaunchGemmTile<__nv_bfloat16, DoubleQuantScales>(
    TileArgs<DoubleQuantScales>, const TilePlan&, cudaStream_t);

}  // namespace jax_nf4
