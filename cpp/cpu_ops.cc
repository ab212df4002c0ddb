// CPU FFI handlers for the NF4 ops, exported to Python by nanobind as `jax_nf4._nf4_cpu`.
// Reference-quality loops: they follow nf4_math.h exactly and serve machines without a GPU.
// Rows are spread over XLA's intra-op thread pool; every output element is computed by one
// thread in one fixed order, so results do not depend on the number of threads.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "host_dtypes.h"
#include "nanobind/nanobind.h"
#include "nf4_ffi_shapes.h"
#include "nf4_math.h"
#include "nf4_scales.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

// The fused decode-attention step (attention_cpu.cc).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxNf4DecodeAttentionCpu);

namespace jax_nf4 {
namespace {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the storage type of an activation dtype.
template <typename Fn>
ffi::Error DispatchActivation(ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F32: fn(TypeTag<float>{}); return ffi::Error::Success();
    case ffi::DataType::BF16: fn(TypeTag<BFloat16>{}); return ffi::Error::Success();
    case ffi::DataType::F16: fn(TypeTag<Float16>{}); return ffi::Error::Success();
    default: return ffi::Error::InvalidArgument("unsupported activation dtype");
  }
}

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

// CodeValue as a table, for the host loops.
struct Codebook {
  float value[16];
  constexpr Codebook() : value{} {
    for (int i = 0; i < 16; ++i) value[i] = CodeValue(i);
  }
};
constexpr Codebook kCodebook;

// Float32 dot product of a[0..n) and b[0..n) in a fixed order: 16 interleaved partial sums
// (lane i takes the elements k = i mod 16, which compilers turn into SIMD adds), then the
// partial sums pairwise, then the tail. The same order on every call and thread count.
float Dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  float lane[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t k = 0; k < body; k += kLanes)
    for (int i = 0; i < kLanes; ++i) lane[i] += a[k + i] * b[k + i];
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lane[i] += lane[i + width];
  float sum = lane[0];
  for (int64_t k = body; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

// Dequantizes one row into float32: row[k] = CodeValue(code(n, k)) * scale(n, k / bs).
template <typename ScaleRow>
void DequantizeRow(const uint8_t* packed_row, int nibble, const ScaleRow& scale_of,
                   const Nf4Dims& d, float* row) {
  for (int64_t b = 0; b < d.blocks(); ++b) {
    const float scale = scale_of(b);
    for (int64_t k = b * d.block_size; k < (b + 1) * d.block_size; ++k) {
      const uint32_t byte = packed_row[k];
      row[k] = kCodebook.value[nibble ? OddRowCode(byte) : EvenRowCode(byte)] * scale;
    }
  }
}

ffi::Error QuantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer w,
                        ffi::Result<ffi::AnyBuffer> packed, ffi::Result<ffi::AnyBuffer> absmax,
                        int64_t block_size) {
  Nf4Dims d;
  if (auto e = CheckQuantizeInput(w, block_size, &d); e.failure()) return e;
  if (auto e = CheckPacked("nf4_quantize", *packed, block_size, &d); e.failure()) return e;
  if (auto e = CheckAbsmax("nf4_quantize", *absmax, d); e.failure()) return e;
  if (d.groups * d.rows * d.cols == 0) return ffi::Error::Success();
  auto* out_packed = static_cast<uint8_t*>(packed->untyped_data());
  auto* out_absmax = static_cast<float*>(absmax->untyped_data());
  return DispatchActivation(w.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = static_cast<const T*>(w.untyped_data());
    // Row pairs (g * N/2 + pair) in parallel: each writes its packed row and its two absmax rows.
    ParallelFor(pool, d.groups * (d.rows / 2), 2 * d.cols, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> codes(static_cast<size_t>(d.cols));
      for (int64_t rp = begin; rp < end; ++rp) {
        uint8_t* prow = out_packed + rp * d.cols;
        for (int64_t h = 0; h < 2; ++h) {
          const T* row = src + (2 * rp + h) * d.cols;  // g * N + n with n = 2 * pair + h
          float* amax_row = out_absmax + (2 * rp + h) * d.blocks();
          for (int64_t b = 0; b < d.blocks(); ++b) {
            const int64_t k0 = b * d.block_size;
            float amax = 0.0f;
            for (int64_t k = k0; k < k0 + d.block_size; ++k)
              amax = AbsMaxUpdate(amax, ToFloat(row[k]));
            amax_row[b] = amax;
            const float inv = InverseScale(amax);
            for (int64_t k = k0; k < k0 + d.block_size; ++k)
              codes[k] = QuantizeElement(ToFloat(row[k]), amax, inv);
          }
          for (int64_t k = 0; k < d.cols; ++k)
            prow[k] = h == 0 ? codes[k] : PackPair(prow[k], codes[k]);
        }
      }
    });
  });
}

template <typename Scales>
ffi::Error Dequantize(ffi::ThreadPool& pool, ffi::AnyBuffer packed, const Scales& scales,
                      const Nf4Dims& d, ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = CheckDense("nf4_dequantize", "output", *out, d); e.failure()) return e;
  if (d.groups * d.rows * d.cols == 0) return ffi::Error::Success();
  const auto* src = static_cast<const uint8_t*>(packed.untyped_data());
  return DispatchActivation(out->element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = static_cast<T*>(out->untyped_data());
    ParallelFor(pool, d.groups * d.rows, d.cols, [&](int64_t begin, int64_t end) {
      std::vector<float> row(static_cast<size_t>(d.cols));
      for (int64_t gn = begin; gn < end; ++gn) {  // gn = g * N + n
        const int64_t g = gn / d.rows, n = gn % d.rows;
        DequantizeRow(src + (g * (d.rows / 2) + n / 2) * d.cols, static_cast<int>(n % 2),
                      scales.RowOf(g, n, d.rows, d.blocks()), d, row.data());
        T* drow = dst + gn * d.cols;
        for (int64_t k = 0; k < d.cols; ++k) drow[k] = FromFloat<T>(row[k]);
      }
    });
  });
}

template <typename Scales>
ffi::Error Matmul(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer packed,
                  const Scales& scales, const Nf4Dims& d, ffi::Result<ffi::AnyBuffer> out) {
  int64_t m_rows = 0;
  if (auto e = CheckMatmul(x, *out, d, &m_rows); e.failure()) return e;
  if (d.groups * m_rows * d.rows == 0) return ffi::Error::Success();
  const auto* src = static_cast<const uint8_t*>(packed.untyped_data());
  return DispatchActivation(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xs = static_cast<const T*>(x.untyped_data());
    T* ys = static_cast<T*>(out->untyped_data());
    std::vector<float> xf(static_cast<size_t>(m_rows * d.cols));
    for (int64_t g = 0; g < d.groups; ++g) {
      const T* xg = xs + g * m_rows * d.cols;
      for (int64_t i = 0; i < m_rows * d.cols; ++i) xf[i] = ToFloat(xg[i]);
      // Weight rows in parallel; each output element is one float32 dot product (Dot's order).
      ParallelFor(pool, d.rows, (m_rows + 1) * d.cols, [&](int64_t begin, int64_t end) {
        std::vector<float> row(static_cast<size_t>(d.cols));
        for (int64_t n = begin; n < end; ++n) {
          DequantizeRow(src + (g * (d.rows / 2) + n / 2) * d.cols, static_cast<int>(n % 2),
                        scales.RowOf(g, n, d.rows, d.blocks()), d, row.data());
          for (int64_t m = 0; m < m_rows; ++m)
            ys[(g * m_rows + m) * d.rows + n] =
                FromFloat<T>(Dot(row.data(), xf.data() + m * d.cols, d.cols));
        }
      });
    }
  });
}

ffi::Error DequantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::AnyBuffer absmax,
                          ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  return WithWeight("nf4_dequantize", packed, block_size, absmax,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Dequantize(pool, packed, scales, d, out);
                    });
}

ffi::Error DequantizeDqImpl(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::AnyBuffer codes,
                            ffi::AnyBuffer nested, ffi::AnyBuffer table, ffi::AnyBuffer offset,
                            ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  return WithWeight("nf4_dequantize", packed, block_size, codes, nested, table, offset,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Dequantize(pool, packed, scales, d, out);
                    });
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer packed,
                      ffi::AnyBuffer absmax, ffi::Result<ffi::AnyBuffer> out,
                      int64_t block_size) {
  return WithWeight("nf4_matmul", packed, block_size, absmax,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Matmul(pool, x, packed, scales, d, out);
                    });
}

ffi::Error MatmulDqImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer packed,
                        ffi::AnyBuffer codes, ffi::AnyBuffer nested, ffi::AnyBuffer table,
                        ffi::AnyBuffer offset, ffi::Result<ffi::AnyBuffer> out,
                        int64_t block_size) {
  return WithWeight("nf4_matmul", packed, block_size, codes, nested, table, offset,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Matmul(pool, x, packed, scales, d, out);
                    });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kNf4QuantizeCpu, QuantizeImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // w
                           .Ret<ffi::AnyBuffer>()  // packed
                           .Ret<ffi::AnyBuffer>()  // absmax
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4DequantizeCpu, DequantizeImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax
                           .Ret<ffi::AnyBuffer>()  // w
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4DequantizeDqCpu, DequantizeDqImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax codes
                           .Arg<ffi::AnyBuffer>()  // nested_absmax
                           .Arg<ffi::AnyBuffer>()  // table
                           .Arg<ffi::AnyBuffer>()  // offset
                           .Ret<ffi::AnyBuffer>()  // w
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4MatmulCpu, MatmulImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // x
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax
                           .Ret<ffi::AnyBuffer>()  // out
                           .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER(kNf4MatmulDqCpu, MatmulDqImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // x
                           .Arg<ffi::AnyBuffer>()  // packed
                           .Arg<ffi::AnyBuffer>()  // absmax codes
                           .Arg<ffi::AnyBuffer>()  // nested_absmax
                           .Arg<ffi::AnyBuffer>()  // table
                           .Arg<ffi::AnyBuffer>()  // offset
                           .Ret<ffi::AnyBuffer>()  // out
                           .Attr<int64_t>("block_size"));

}  // namespace jax_nf4

NB_MODULE(_nf4_cpu, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["nf4_quantize"] = nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4QuantizeCpu));
    targets["nf4_dequantize"] = nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4DequantizeCpu));
    targets["nf4_matmul"] = nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4MatmulCpu));
    targets["nf4_dequantize_dq"] =
        nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4DequantizeDqCpu));
    targets["nf4_matmul_dq"] = nb::capsule(reinterpret_cast<void*>(jax_nf4::kNf4MatmulDqCpu));
    targets["decode_attention"] = nb::capsule(reinterpret_cast<void*>(JaxNf4DecodeAttentionCpu));
    return targets;
  });
}
