// Probe of the Hopper wgmma conventions a register-A NF4 kernel relies on (sm_90a only):
//   * A (64 x 16, bf16) from registers, each warp w of the warpgroup holding rows 16w..16w+15
//     in the mma.m16n8k16 A-fragment layout (the layout jax_nf4's PairTable produces):
//     a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
//   * B (N x 16, bf16, K-major: each activation row's 16 k contiguous) in shared memory as
//     8-row x 16-byte core matrices (128 contiguous bytes each), described by a no-swizzle
//     matrix descriptor whose two byte strides are tried both ways round;
//   * the f32 accumulator layout: d[4j + 0, 1] = D[g][8j + 2t, + 1], d[4j + 2, 3] = D[g + 8][..].
// It prints the largest error against a float64 host reference for each descriptor variant and
// the instruction-shape / accumulate checks, and exits 0 when variant 0 (LBO = the stride
// between the two k halves, SBO = the stride between 8-row groups) is exact.
//
//   nvcc -std=c++17 -O2 -arch=sm_90a bench/wgmma_probe.cu -o /tmp/wgmma_probe && /tmp/wgmma_probe
#include <cuda_bf16.h>
#include <cstdint>
#include <cstdio>
#include <cmath>
#include <random>
#include <vector>

#include "cuda_check.h"

constexpr int kN = 64;  // activation rows per instruction (wgmma N)

// No-swizzle shared-memory matrix descriptor: start address, leading and stride byte offsets
// (all in 16-byte units), swizzle mode 0.
__device__ uint64_t Descriptor(uint32_t smem_address, uint32_t lbo, uint32_t sbo) {
  return uint64_t((smem_address & 0x3ffff) >> 4) | (uint64_t((lbo & 0x3ffff) >> 4) << 16) |
         (uint64_t((sbo & 0x3ffff) >> 4) << 32);
}

__device__ void WgmmaM64N64K16(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                               int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
        "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
        "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
        "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate)
      : "memory");
}

// One warpgroup: D[64][kN] = sum over `steps` k16 slices of A_s (64 x 16) B_s^T (kN x 16).
// B of step s sits at byte offset s * kN * 32: core matrix (n-group i, k-half h) at
// 128 * (2 i + h) (k-half stride 128, 8-row-group stride 256).
__global__ void Probe(const __nv_bfloat16* a, const __nv_bfloat16* b, float* out, int steps,
                      int variant) {
  __shared__ __align__(128) __nv_bfloat16 sb[4 * kN * 16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int i = threadIdx.x; i < steps * kN * 2; i += blockDim.x) {  // 16-byte chunks
    const int s = i / (kN * 2), n = (i / 2) % kN, h = i % 2;
    const int offset = s * kN * 32 + 128 * (2 * (n / 8) + h) + 16 * (n % 8);
    *reinterpret_cast<uint4*>(reinterpret_cast<char*>(sb) + offset) =
        *reinterpret_cast<const uint4*>(b + (s * kN + n) * 16 + 8 * h);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to wgmma's reads
  __syncthreads();
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.0f;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(sb));
  for (int s = 0; s < steps; ++s) {
    const __nv_bfloat16* as = a + s * 64 * 16;
    auto pair = [&](int row, int k) {
      const __nv_bfloat162 v = __halves2bfloat162(as[row * 16 + k], as[row * 16 + k + 1]);
      return *reinterpret_cast<const uint32_t*>(&v);
    };
    const int r = 16 * warp + g;
    const uint32_t frag[4] = {pair(r, 2 * t), pair(r + 8, 2 * t), pair(r, 2 * t + 8),
                              pair(r + 8, 2 * t + 8)};
    const uint32_t k_half = 128, row_group = 256;
    const uint64_t desc = variant == 0
                              ? Descriptor(base + s * kN * 32, k_half, row_group)
                              : Descriptor(base + s * kN * 32, row_group, k_half);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    WgmmaM64N64K16(d, frag, desc, s > 0);
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  }
  for (int j = 0; j < kN / 8; ++j) {
    const int r = 16 * warp + g, c = 8 * j + 2 * t;
    out[r * kN + c] = d[4 * j];
    out[r * kN + c + 1] = d[4 * j + 1];
    out[(r + 8) * kN + c] = d[4 * j + 2];
    out[(r + 8) * kN + c + 1] = d[4 * j + 3];
  }
}

int main() {
  const int steps = 4;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  std::vector<__nv_bfloat16> a(steps * 64 * 16), b(steps * kN * 16);
  for (auto& v : a) v = __float2bfloat16(normal(gen));
  for (auto& v : b) v = __float2bfloat16(normal(gen));
  __nv_bfloat16 *da, *db;
  float* dout;
  CHECK(cudaMalloc(&da, a.size() * 2));
  CHECK(cudaMalloc(&db, b.size() * 2));
  CHECK(cudaMalloc(&dout, 64 * kN * 4));
  CHECK(cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
  bool exact0 = false;
  for (int used : {1, steps}) {
    std::vector<double> ref(64 * kN, 0.0);
    for (int s = 0; s < used; ++s)
      for (int m = 0; m < 64; ++m)
        for (int n = 0; n < kN; ++n)
          for (int k = 0; k < 16; ++k)
            ref[m * kN + n] += double(__bfloat162float(a[(s * 64 + m) * 16 + k])) *
                               double(__bfloat162float(b[(s * kN + n) * 16 + k]));
    for (int variant = 0; variant < 2; ++variant) {
      CHECK(cudaMemset(dout, 0xff, 64 * kN * 4));  // poison: NaN where nothing is written
      Probe<<<1, 128>>>(da, db, dout, used, variant);
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
      std::vector<float> out(64 * kN);
      CHECK(cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost));
      double worst = 0.0;
      for (int i = 0; i < 64 * kN; ++i) {
        const double err = std::fabs(out[i] - ref[i]);
        worst = std::isnan(err) || err > worst ? (std::isnan(err) ? INFINITY : err) : worst;
      }
      std::printf("k16 steps %d, descriptor variant %d (%s): max |error| %.3g\n", used,
                  variant, variant == 0 ? "LBO = k-half stride, SBO = 8-row stride"
                                        : "LBO = 8-row stride, SBO = k-half stride",
                  worst);
      if (variant == 0 && used == steps) exact0 = worst < 1e-3;
    }
  }
  std::printf(exact0 ? "variant 0 exact: the conventions hold\n"
                     : "variant 0 NOT exact: see the table above\n");
  return exact0 ? 0 : 1;
}
