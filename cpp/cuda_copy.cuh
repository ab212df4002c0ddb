// Asynchronous global -> shared memory copies of the CUDA kernels (cp.async, sm_80+).
#pragma once

#include <cstdint>

namespace jax_nf4 {

// The shared-state-space address of a generic pointer to shared memory.
__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes from global memory to shared address `dst` without a register, or 16 zero bytes
// where !valid (src is then not read).
__device__ __forceinline__ void CopyAsync16(uint32_t dst, const void* src, bool valid = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, bool valid = true) {
  CopyAsync16(SharedAddress(dst), src, valid);
}
// Closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void CopyAsyncCommit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most this thread's N newest groups are still in flight.
template <int N>
__device__ __forceinline__ void CopyAsyncWait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

}  // namespace jax_nf4
