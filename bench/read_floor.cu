// The read floor of this GPU for the weight byte counts of the matmul benchmark: the time per
// call of a kernel that only streams the bytes (16-byte streaming loads, several in flight per
// thread, an XOR that keeps them) and of an empty kernel, back to back on one stream, with
// buffers rotated over > 256 MB so the L2 cannot serve them. The best launch shape of a sweep
// (threads per CTA, CTAs per SM, loads in flight) is the floor an NF4 GEMV of that shape can
// approach (it reads the same bytes and must also decode and multiply). Back-to-back launches
// are also bounded by the host's launch rate: the empty kernel's time per launch shows it.
// A second table reads the code bytes in the byte-pair GEMV's pattern (layout A, and a
// tile-major layout a repack could give) against a plain stream at the same launch shape.
//   nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 bench/read_floor.cu -o /tmp/rf
//   /tmp/rf            (bash bench/gpu_run.sh floor)
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "cuda_check.h"

template <int U>
__global__ void Read(const uint4* __restrict__ p, int64_t n16, uint32_t* out) {
  uint32_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (; i + (U - 1) * stride < n16; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // (almost) never stores; keeps the loads
}

// The byte-pair GEMV's access pattern without its arithmetic: a persistent grid of 16-warp CTAs
// over tiles of 16 row pairs, warp w reading its slice w of the 64-element spans (K / 64 / 16 of
// them), lane (g, t) 16 bytes of row pairs 16 tile + g and 16 tile + g + 8 at byte 64 s + 16 t
// of each span s, U spans per load group. kInterleaved: warp w reads spans w, w + 16, ...
// instead (the tile's warps on adjacent spans at a time). kTileMajor: the same bytes in a
// layout where each (tile, span) is one contiguous KB (pair p's 64 bytes at (p % 16) * 64), so
// a warp's load is 512 contiguous bytes and its slice a contiguous run.
enum class Pattern { kSlices, kInterleaved, kTileMajor };
template <int U, Pattern kPattern>
__global__ void __launch_bounds__(512, 1) ReadPairPattern(const uint8_t* __restrict__ w,
                                                          int64_t pairs, int64_t k,
                                                          uint32_t* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t steps = k / 64, tiles = (pairs + 15) / 16, per = (steps + 15) / 16;
  const int64_t begin = warp * per, end = begin + per < steps ? begin + per : steps;
  auto span = [&](int64_t i) {
    return kPattern == Pattern::kInterleaved ? (i - begin) * 16 + warp : i;
  };
  uint32_t acc = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t pa = tile * 16 + g < pairs ? tile * 16 + g : pairs - 1;
    const int64_t pb = tile * 16 + g + 8 < pairs ? tile * 16 + g + 8 : pairs - 1;
    for (int64_t s = begin; s < end; s += U) {
      uint4 v[U][2];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s + u >= end || span(s + u) >= steps) break;
        const uint8_t *a, *b;
        if constexpr (kPattern == Pattern::kTileMajor) {
          a = w + (tile * steps + s + u) * 1024 + 16 * lane;
          b = a + 512;
        } else {
          a = w + pa * k + span(s + u) * 64 + 16 * t;
          b = w + pb * k + span(s + u) * 64 + 16 * t;
        }
        v[u][0] = __ldcs(reinterpret_cast<const uint4*>(a));
        v[u][1] = __ldcs(reinterpret_cast<const uint4*>(b));
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s + u >= end || span(s + u) >= steps) break;
        acc ^= v[u][0].x ^ v[u][0].y ^ v[u][0].z ^ v[u][0].w ^ v[u][1].x ^ v[u][1].y ^ v[u][1].z ^
               v[u][1].w;
      }
    }
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // (almost) never stores; keeps the loads
}

__global__ void Empty(uint32_t* out) {
  if (threadIdx.x == 1024) out[0] = 0;  // never true
}

using Kernel = void (*)(const uint4*, int64_t, uint32_t*);
Kernel ReadKernel(int u) {
  switch (u) {
    case 1: return Read<1>;
    case 2: return Read<2>;
    case 4: return Read<4>;
    default: return Read<8>;
  }
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("device: %s, %d SMs\n", prop.name, sms);
  struct Shape {
    const char* name;
    int64_t n, k;
    double target_us;  // issue 6, M = 1
  };
  const Shape shapes[] = {{"4096x4096", 4096, 4096, 6},
                          {"14336x4096", 14336, 4096, 25},
                          {"8192x8192", 8192, 8192, 15},
                          {"28672x8192", 28672, 8192, 50}};
  const int64_t pool = int64_t(512) << 20;  // rotated so the 50 MB L2 cannot hold the bytes
  uint8_t* base = nullptr;
  uint32_t* out = nullptr;
  CHECK(cudaMalloc(&base, pool));
  CHECK(cudaMalloc(&out, 1 << 20));
  CHECK(cudaMemset(base, 0x5a, pool));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  const int reps = 300;

  // Empty kernel, back to back: the launch floor of a grid of one 512-thread CTA per SM.
  for (int i = 0; i < 20; ++i) Empty<<<sms, 512>>>(out);
  CHECK(cudaEventRecord(start));
  for (int i = 0; i < reps; ++i) Empty<<<sms, 512>>>(out);
  CHECK(cudaEventRecord(stop));
  CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, start, stop));
  std::printf("empty kernel (%d x 512 threads), back to back: %.2f us per launch\n", sms,
              1e3 * ms / reps);

  // Microseconds per call of launch(p), back to back, p rotating over the pool's slots of
  // `bytes` (after two warm-up rotations).
  auto us_per_call = [&](int64_t bytes, auto launch) {
    const int64_t slot = (bytes + 4095) / 4096 * 4096;
    const int copies = int(pool / slot);
    auto at = [&](int i) { return base + int64_t(i % copies) * slot; };
    for (int i = 0; i < 2 * copies; ++i) launch(at(i));
    CHECK(cudaEventRecord(start));
    for (int i = 0; i < reps; ++i) launch(at(i));
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    CHECK(cudaGetLastError());
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    return 1e3 * ms / reps;
  };

  std::printf("| N x K | NF4 bytes (codes + f32 scales) | read floor us | TB/s | best launch "
              "(threads x CTAs/SM, loads in flight) | 1 CTA of 512 / SM, 8 loads us | "
              "issue 6 target us |\n|---|---|---|---|---|---|---|\n");
  for (const Shape& s : shapes) {
    const int64_t bytes = s.n * s.k / 2 + s.n * (s.k / 64) * 4;
    const int64_t n16 = bytes / 16;
    double best = 1e30, byte_pair_like = 0;
    int best_threads = 0, best_per_sm = 0, best_u = 0;
    for (int threads : {256, 512, 1024})
      for (int per_sm : {1, 2, 4, 8})
        for (int u : {1, 2, 4, 8}) {
          if (threads * per_sm > 2048) continue;
          Kernel kernel = ReadKernel(u);
          const int grid = sms * per_sm;
          const double us = us_per_call(bytes, [&](const uint8_t* p) {
            kernel<<<grid, threads>>>(reinterpret_cast<const uint4*>(p), n16, out);
          });
          if (threads == 512 && per_sm == 1 && u == 8) byte_pair_like = us;
          if (us < best) best = us, best_threads = threads, best_per_sm = per_sm, best_u = u;
        }
    std::printf("| %s | %.1f MB | %.2f | %.2f | %d x %d, %d | %.2f | %.0f |\n", s.name,
                bytes / 1e6, best, bytes / best / 1e6, best_threads, best_per_sm, best_u,
                byte_pair_like, s.target_us);
  }

  // The GEMV's access pattern against a plain stream of the same code bytes (no scales), each
  // as one 512-thread CTA per SM.
  std::printf("\n| N x K | code bytes | contiguous, 8 loads us | byte-pair pattern, U = 2 / 4 us | "
              "interleaved spans, U = 2 / 4 us | tile-major layout, U = 2 / 4 us |\n"
              "|---|---|---|---|---|---|\n");
  for (const Shape& s : shapes) {
    const int64_t bytes = s.n * s.k / 2, pairs = s.n / 2;
    const double plain = us_per_call(bytes, [&](const uint8_t* p) {
      Read<8><<<sms, 512>>>(reinterpret_cast<const uint4*>(p), bytes / 16, out);
    });
    auto pattern = [&](auto kernel) {
      return us_per_call(bytes,
                         [&](const uint8_t* p) { kernel<<<sms, 512>>>(p, pairs, s.k, out); });
    };
    const double slices[] = {pattern(ReadPairPattern<2, Pattern::kSlices>),
                             pattern(ReadPairPattern<4, Pattern::kSlices>)};
    const double interleaved[] = {pattern(ReadPairPattern<2, Pattern::kInterleaved>),
                                  pattern(ReadPairPattern<4, Pattern::kInterleaved>)};
    const double tiles[] = {pattern(ReadPairPattern<2, Pattern::kTileMajor>),
                            pattern(ReadPairPattern<4, Pattern::kTileMajor>)};
    std::printf("| %s | %.1f MB | %.2f | %.2f / %.2f | %.2f / %.2f | %.2f / %.2f |\n", s.name,
                bytes / 1e6, plain, slices[0], slices[1], interleaved[0], interleaved[1],
                tiles[0], tiles[1]);
  }
  return 0;
}
