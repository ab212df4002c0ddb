// The NF4 matmul kernels' launch interface, between the FFI handlers (cuda_ops.cu) and the
// kernel files: the operand structs the handlers fill, the launch plans, and one entry point
// per kernel family, each defined (and instantiated for the activation dtypes and scale kinds
// it serves) in its own file: gemv_cuda.cu (M <= kMaxFusedRows), tiled_cuda.cu (the tiled
// tensor-core kernel above), wgmma_cuda.cu (sm_90a, M > kWgMinRows) and quantize_cuda.cu.
// Every entry point returns the launch's CUDA error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "nf4_scales.h"

namespace jax_nf4 {

constexpr int kMaxFusedRows = 8;   // activation rows up to which the GEMV kernels run
constexpr int kTcSpan = 64;         // the tensor-core kernels' contraction span (block sizes
                                    // are multiples of it there)
constexpr int64_t kWgMinRows = 64;  // M from which the launch prefers the wgmma kernel (sm_90)

// log2(v) where v is a power of two, else -1.
inline int Log2IfPowerOfTwo(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int shift = 0;
  while ((int64_t(1) << shift) < v) ++shift;
  return shift;
}

// The GEMV kernels' operands (m0, ctas_per_group, groups, splits and steps_per_split are set
// by the launch).
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

// The tiled and wgmma kernels' operands (row_blocks .. spans_per_split are set from the tiled
// kernel's plan at launch; the wgmma launch passes its plan beside them).
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

// The grid of the tiled kernel for an n-tile count: its K split (ChooseKSplit) over slots = SMs
// x the CTAs an SM holds, in stages of two spans, at least four stages per CTA (shorter ones
// measured slower: 4096^2 at M = 16 split 16 ways took 14.5 µs, 8 ways 12.4).
struct TilePlan {
  int nt = 0;
  int64_t row_blocks = 0, m_tiles = 0;
  int k_splits = 1, spans_per_split = 0;
  int64_t partial_bytes = 0;  // scratch for the split-K partial sums
};

// The wgmma kernel's grid: the CTA shape (WgShape) and the K split (ChooseKSplit, one stage per
// 64-element span).
struct WgPlan {
  int tiles = 0, tokens = 0;  // TL, N
  int row_blocks = 0, m_tiles = 0, k_splits = 1, stages_per_split = 0;
  bool cluster = false;       // the K splits of a tile are one cluster (else float32 partials)
  int64_t partial_bytes = 0;  // scratch for the partials
};

// gemv_cuda.cu: the fused GEMV for M <= kMaxFusedRows activation rows. T: float, __half or
// __nv_bfloat16; tensor_cores: 16-bit activations and a block size that is a power-of-two
// multiple of kTcSpan (the byte-pair kernel where a CTA can have `shared_optin` bytes of
// shared memory, else the 16-row-tile GEMV); otherwise the SIMT kernels.
template <typename T, typename Scales>
cudaError_t LaunchGemv(GemvArgs<Scales> a, int64_t groups, bool tensor_cores, int sms,
                       int shared_optin, cudaStream_t stream);

// tiled_cuda.cu (T: __half or __nv_bfloat16).
int ChooseTileNt(int64_t m_total, int shared_optin);
template <typename T, typename Scales>
cudaError_t PrepareGemmTile(int nt, int device, int* ctas_per_sm);
TilePlan PlanGemmTile(int nt, int64_t groups, int64_t m_total, int64_t pairs, int64_t cols,
                      int64_t slots);
template <typename T, typename Scales>
cudaError_t LaunchGemmTile(TileArgs<Scales> a, const TilePlan& plan, cudaStream_t stream);

// wgmma_cuda.cu (T: __half or __nv_bfloat16).
bool WgmmaUsable(int device);
WgPlan PlanWgmma(int64_t groups, int64_t m_total, int64_t pairs, int64_t cols, int sms);
template <typename T, typename Scales>
cudaError_t LaunchGemmWgmma(const TileArgs<Scales>& a, const WgPlan& plan, int device,
                            cudaStream_t stream);

// quantize_cuda.cu (T: float, __half or __nv_bfloat16): packed [G, N/2, K] codes and absmax
// [G, N, K / block_size] from w [G, N, K] (pairs = N / 2), and the inverse.
template <typename T>
cudaError_t LaunchQuantize(const T* w, uint8_t* packed, float* absmax, int64_t groups,
                           int64_t pairs, int64_t cols, int64_t block_size, cudaStream_t stream);
template <typename T, typename Scales>
cudaError_t LaunchDequantize(const uint8_t* packed, const Scales& scales, T* out, int64_t groups,
                             int64_t pairs, int64_t cols, int64_t block_size,
                             cudaStream_t stream);

}  // namespace jax_nf4
