// The wgmma matmul (Hopper, sm_90a) for 16-bit activations above kWgMinRows rows; builds
// without sm_90a code keep the planner and a launch that WgmmaUsable never lets run.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cooperative_groups.h>

#include "cuda_common.cuh"
#include "cuda_copy.cuh"
#include "cuda_launch.cuh"
#include "cuda_matmul.h"
#include "nf4_scales.h"

namespace jax_nf4 {
namespace {

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

}  // namespace

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
template <typename T, typename Scales>
cudaError_t LaunchGemmWgmma(const TileArgs<Scales>& a, const WgPlan& plan, int device,
                            cudaStream_t stream) {
  if (plan.tiles == 2) return LaunchGemmWgmmaShape<T, Scales, 2, 128>(a, plan, device, stream);
  return plan.tokens == 256 ? LaunchGemmWgmmaShape<T, Scales, 1, 256>(a, plan, device, stream)
                            : LaunchGemmWgmmaShape<T, Scales, 1, 128>(a, plan, device, stream);
}

// Explicit instantiations: the dtypes and scale kinds the handlers call with.
template cudaError_t LaunchGemmWgmma<__half, PlainScales>(
    const TileArgs<PlainScales>&, const WgPlan&, int, cudaStream_t);
template cudaError_t LaunchGemmWgmma<__half, DoubleQuantScales>(
    const TileArgs<DoubleQuantScales>&, const WgPlan&, int, cudaStream_t);
template cudaError_t LaunchGemmWgmma<__nv_bfloat16, PlainScales>(
    const TileArgs<PlainScales>&, const WgPlan&, int, cudaStream_t);
template cudaError_t LaunchGemmWgmma<__nv_bfloat16, DoubleQuantScales>(
    const TileArgs<DoubleQuantScales>&, const WgPlan&, int, cudaStream_t);

}  // namespace jax_nf4
