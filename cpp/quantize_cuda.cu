// Dequantize (NF4 to the activation dtype) and quantize (a dense weight to NF4 codes and
// absmax), grid-stride kernels over row pairs.
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
}  // namespace

template <typename T>
cudaError_t LaunchQuantize(const T* w, uint8_t* packed, float* absmax, int64_t groups,
                           int64_t pairs, int64_t cols, int64_t block_size, cudaStream_t stream) {
  auto chunked = [&](auto kernel) {
    kernel<<<GridFor(groups * pairs * (cols / 16), kThreads), kThreads, 0, stream>>>(
        w, packed, absmax, groups, pairs, cols, block_size);
    return cudaGetLastError();
  };
  switch (block_size) {  // 16-byte path: block_size / 16 threads per block, a power of two
    case 32: return chunked(QuantizeChunkKernel<T, 2>);
    case 64: return chunked(QuantizeChunkKernel<T, 4>);
    case 128: return chunked(QuantizeChunkKernel<T, 8>);
    case 256: return chunked(QuantizeChunkKernel<T, 16>);
    case 512: return chunked(QuantizeChunkKernel<T, 32>);
    default:
      QuantizeKernel<T><<<GridFor(groups * pairs * (cols / block_size), kWarps), kThreads, 0,
                          stream>>>(w, packed, absmax, groups, pairs, cols, block_size);
      return cudaGetLastError();
  }
}

template <typename T, typename Scales>
cudaError_t LaunchDequantize(const uint8_t* packed, const Scales& scales, T* out, int64_t groups,
                             int64_t pairs, int64_t cols, int64_t block_size,
                             cudaStream_t stream) {
  constexpr int kStoreV = 16 / sizeof(T);  // packed bytes per thread for 16-byte stores
  auto launch = [&](auto v_tag) {
    constexpr int V = decltype(v_tag)::value;
    const int64_t work = groups * pairs * (cols / V);
    // 32-bit indices while the last index plus the grid's stride (< 2^24) stays below 2^32
    auto kernel = work < (int64_t(1) << 31) ? DequantizeKernel<T, V, uint32_t, Scales>
                                            : DequantizeKernel<T, V, int64_t, Scales>;
    kernel<<<GridFor(work, kThreads), kThreads, 0, stream>>>(packed, scales, out, groups, pairs,
                                                             cols, block_size);
    return cudaGetLastError();
  };
  return block_size % kStoreV == 0 ? launch(std::integral_constant<int, kStoreV>{})
                                   : launch(std::integral_constant<int, 1>{});
}

// Explicit instantiations: the dtypes and scale kinds the handlers call with.
template cudaError_t LaunchQuantize<float>(
    const float*, uint8_t*, float*, int64_t, int64_t, int64_t, int64_t,
    cudaStream_t);
template cudaError_t LaunchQuantize<__half>(
    const __half*, uint8_t*, float*, int64_t, int64_t, int64_t, int64_t,
    cudaStream_t);
template cudaError_t LaunchQuantize<__nv_bfloat16>(
    const __nv_bfloat16*, uint8_t*, float*, int64_t, int64_t, int64_t, int64_t,
    cudaStream_t);
template cudaError_t LaunchDequantize<float, PlainScales>(
    const uint8_t*, const PlainScales&, float*, int64_t, int64_t, int64_t, int64_t,
    cudaStream_t);
template cudaError_t LaunchDequantize<float, DoubleQuantScales>(
    const uint8_t*, const DoubleQuantScales&, float*, int64_t, int64_t, int64_t, int64_t,
    cudaStream_t);
template cudaError_t LaunchDequantize<__half, PlainScales>(
    const uint8_t*, const PlainScales&, __half*, int64_t, int64_t, int64_t, int64_t,
    cudaStream_t);
template cudaError_t LaunchDequantize<__half, DoubleQuantScales>(
    const uint8_t*, const DoubleQuantScales&, __half*, int64_t, int64_t, int64_t, int64_t,
    cudaStream_t);
template cudaError_t LaunchDequantize<__nv_bfloat16, PlainScales>(
    const uint8_t*, const PlainScales&, __nv_bfloat16*, int64_t, int64_t, int64_t, int64_t,
    cudaStream_t);
template cudaError_t LaunchDequantize<__nv_bfloat16, DoubleQuantScales>(
    const uint8_t*, const DoubleQuantScales&, __nv_bfloat16*, int64_t, int64_t, int64_t, int64_t,
    cudaStream_t);

}  // namespace jax_nf4
