// What the CPU handlers share beside the dtypes: the AVX2 multi-versioning switch and the loop
// over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
// The hot loops are also compiled for AVX2 and picked at run time (GCC / Clang function
// multi-versioning through glibc's ifunc). Both versions do the same float32
// operations in the same order (no FMA contraction: -ffp-contract=off), so results do not
// depend on the CPU.
#define JAX_NF4_AVX2 1
#define JAX_NF4_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define JAX_NF4_AVX2 0
#define JAX_NF4_MULTIVERSION
#endif

#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {

namespace ffi = xla::ffi;

// Runs fn(begin, end) over [0, n) in chunks on the intra-op pool and the calling thread, and
// returns when every chunk is done. `cost` is the work per item (in element operations): small
// problems stay on the calling thread. Chunks are claimed from a shared counter, so the caller
// itself finishes whatever no pool thread has started and never waits for a task that has
// not begun (no deadlock when the pool is busy); late tasks find nothing left to claim.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t cost, const Fn& fn) {
  constexpr int64_t kMinChunkCost = int64_t(1) << 16;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 0) + 1;
  const int64_t by_cost = std::max<int64_t>(1, n * std::max<int64_t>(cost, 1) / kMinChunkCost);
  const int64_t chunks = std::min({n, 4 * threads, by_cost});
  if (chunks <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  const int64_t per = (n + chunks - 1) / chunks;
  auto work = [state, per, n, chunks, &fn] {
    for (int64_t c = state->next.fetch_add(1); c < chunks; c = state->next.fetch_add(1)) {
      fn(c * per, std::min(n, (c + 1) * per));
      if (state->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->all_done.notify_all();
      }
    }
  };
  for (int64_t t = 0; t < std::min(threads - 1, chunks - 1); ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->all_done.wait(lock, [&] { return state->done.load() == chunks; });
}

}  // namespace jax_nf4
