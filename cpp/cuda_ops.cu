// CUDA FFI handlers for the NF4 ops: quantize, dequantize and the fused dequant + matmul. They
// check the operands (nf4_ffi_shapes.h) and pick the kernel: the GEMV kernels up to
// kMaxFusedRows activation rows (gemv_cuda.cu), the tiled tensor-core kernel above
// (tiled_cuda.cu), and on sm_90 the wgmma kernel above kWgMinRows (wgmma_cuda.cu); the Python
// lowering sends large M to dequantize + an XLA dot instead. Operands carry a leading group dim
// G (see nf4_ffi_shapes.h). No allocation here: split-K partial sums come from XLA's scratch
// allocator, so the handlers are CUDA-graph compatible.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda_dtypes.cuh"
#include "cuda_matmul.h"
#include "nf4_ffi_shapes.h"
#include "nf4_scales.h"
#include "xla/ffi/api/ffi.h"

namespace jax_nf4 {
namespace {

ffi::Error LaunchError(const char* op, cudaError_t err) {
  return ffi::Error::Internal(std::string(op) + ": CUDA launch failed: " +
                              cudaGetErrorString(err));
}

ffi::Error QuantizeCuda(cudaStream_t stream, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> packed,
                        ffi::Result<ffi::AnyBuffer> absmax, int64_t block_size) {
  Nf4Dims d;
  if (auto e = CheckQuantizeInput(w, block_size, &d); e.failure()) return e;
  if (auto e = CheckPacked("nf4_quantize", *packed, block_size, &d); e.failure()) return e;
  if (auto e = CheckAbsmax("nf4_quantize", *absmax, d); e.failure()) return e;
  if (d.groups * d.rows * d.cols == 0) return ffi::Error::Success();
  cudaError_t err = DispatchActivation(w.element_type(), [&](auto tag) {
    using T = decltype(tag);
    return LaunchQuantize(static_cast<const T*>(w.untyped_data()),
                          static_cast<uint8_t*>(packed->untyped_data()),
                          static_cast<float*>(absmax->untyped_data()), d.groups, d.rows / 2,
                          d.cols, d.block_size, stream);
  });
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_quantize", err);
}

template <typename Scales>
ffi::Error Dequantize(cudaStream_t stream, ffi::AnyBuffer packed, const Scales& scales,
                      const Nf4Dims& d, ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = CheckDense("nf4_dequantize", "output", *out, d); e.failure()) return e;
  if (d.groups * d.rows * d.cols == 0) return ffi::Error::Success();
  cudaError_t err = DispatchActivation(out->element_type(), [&](auto tag) {
    using T = decltype(tag);
    return LaunchDequantize(static_cast<const uint8_t*>(packed.untyped_data()), scales,
                            static_cast<T*>(out->untyped_data()), d.groups, d.rows / 2, d.cols,
                            d.block_size, stream);
  });
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_dequantize", err);
}

// Scratch for a tiled or wgmma launch's split-K partial sums (none where bytes == 0).
ffi::Error AllocatePartialSums(ffi::ScratchAllocator& scratch, int64_t bytes, float** partial) {
  if (bytes == 0) return ffi::Error::Success();
  auto buffer = scratch.Allocate(bytes, 16);
  if (!buffer.has_value())
    return ffi::Error::Internal("nf4_matmul: could not allocate " + std::to_string(bytes) +
                                " bytes of scratch for the split-K partial sums");
  *partial = static_cast<float*>(*buffer);
  return ffi::Error::Success();
}

template <typename Scales>
ffi::Error Matmul(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer x,
                  ffi::AnyBuffer packed, const Scales& scales, const Nf4Dims& d,
                  ffi::Result<ffi::AnyBuffer> out) {
  int64_t m_rows = 0;
  if (auto e = CheckMatmul(x, *out, d, &m_rows); e.failure()) return e;
  if (d.groups * m_rows * d.rows == 0) return ffi::Error::Success();
  if (d.cols == 0) {  // empty contraction: the product is zero
    cudaError_t err = cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream);
    return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_matmul", err);
  }
  const int block_shift = Log2IfPowerOfTwo(d.block_size);
  const bool tensor_cores = x.element_type() != ffi::DataType::F32 &&
                            d.block_size % kTcSpan == 0 && block_shift >= 0;
  int sms = 0, optin = 0, device = 0;  // what the tensor-core kernels are sized by
  if (tensor_cores) {
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  // The tiled and wgmma kernels' operands (their grids are set at launch).
  TileArgs<Scales> tile{};
  tile.x = x.untyped_data();
  tile.packed = static_cast<const uint8_t*>(packed.untyped_data());
  tile.scales = scales;
  tile.out = out->untyped_data();
  tile.groups = d.groups;
  tile.m_total = m_rows;
  tile.pairs = d.rows / 2;
  tile.cols = d.cols;
  tile.block_shift = block_shift;
  if (tensor_cores && m_rows > kWgMinRows && WgmmaUsable(device)) {
    const WgPlan plan = PlanWgmma(d.groups, m_rows, d.rows / 2, d.cols, sms);
    if (auto e = AllocatePartialSums(scratch, plan.partial_bytes, &tile.partial); e.failure())
      return e;
    cudaError_t err = DispatchActivation(x.element_type(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, float>) return cudaErrorInvalidValue;  // not reached
      else return LaunchGemmWgmma<T>(tile, plan, device, stream);
    });
    return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_matmul", err);
  }
  const int tile_nt = tensor_cores && m_rows > kMaxFusedRows ? ChooseTileNt(m_rows, optin) : 0;
  if (tile_nt > 0) {
    int ctas_per_sm = 0;
    cudaError_t err = DispatchActivation(x.element_type(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, float>) return cudaErrorInvalidValue;  // not reached
      else return PrepareGemmTile<T, Scales>(tile_nt, device, &ctas_per_sm);
    });
    if (err != cudaSuccess) return LaunchError("nf4_matmul", err);
    const TilePlan plan = PlanGemmTile(tile_nt, d.groups, m_rows, d.rows / 2, d.cols,
                                       int64_t(sms) * (ctas_per_sm > 0 ? ctas_per_sm : 1));
    if (auto e = AllocatePartialSums(scratch, plan.partial_bytes, &tile.partial); e.failure())
      return e;
    err = DispatchActivation(x.element_type(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, float>) return cudaErrorInvalidValue;  // not reached
      else return LaunchGemmTile<T>(tile, plan, stream);
    });
    return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_matmul", err);
  }
  GemvArgs<Scales> a{};
  a.x = x.untyped_data();
  a.packed = static_cast<const uint8_t*>(packed.untyped_data());
  a.scales = scales;
  a.out = out->untyped_data();
  a.m_total = m_rows;
  a.pairs = d.rows / 2;
  a.cols = d.cols;
  a.block_size = d.block_size;
  a.block_shift = block_shift;
  cudaError_t err = DispatchActivation(x.element_type(), [&](auto tag) {
    return LaunchGemv<decltype(tag)>(a, d.groups, tensor_cores, sms, optin, stream);
  });
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("nf4_matmul", err);
}

ffi::Error DequantizeCuda(cudaStream_t stream, ffi::AnyBuffer packed, ffi::AnyBuffer absmax,
                          ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  return WithWeight("nf4_dequantize", packed, block_size, absmax,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Dequantize(stream, packed, scales, d, out);
                    });
}

ffi::Error DequantizeDqCuda(cudaStream_t stream, ffi::AnyBuffer packed, ffi::AnyBuffer codes,
                            ffi::AnyBuffer nested, ffi::AnyBuffer table, ffi::AnyBuffer offset,
                            ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  return WithWeight("nf4_dequantize", packed, block_size, codes, nested, table, offset,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Dequantize(stream, packed, scales, d, out);
                    });
}

ffi::Error MatmulCuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                      ffi::AnyBuffer packed, ffi::AnyBuffer absmax, ffi::Result<ffi::AnyBuffer> out,
                      int64_t block_size) {
  return WithWeight("nf4_matmul", packed, block_size, absmax,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Matmul(stream, scratch, x, packed, scales, d, out);
                    });
}

ffi::Error MatmulDqCuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                        ffi::AnyBuffer packed, ffi::AnyBuffer codes, ffi::AnyBuffer nested,
                        ffi::AnyBuffer table, ffi::AnyBuffer offset,
                        ffi::Result<ffi::AnyBuffer> out,
                        int64_t block_size) {
  return WithWeight("nf4_matmul", packed, block_size, codes, nested, table, offset,
                    [&](const auto& scales, const Nf4Dims& d) {
                      return Matmul(stream, scratch, x, packed, scales, d, out);
                    });
}

}  // namespace

bool HasWgmmaKernel() {
#if defined(JAX_NF4_SM90A)
  return true;
#else
  return false;
#endif
}

}  // namespace jax_nf4

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4QuantizeCuda, jax_nf4::QuantizeCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Ret<ffi::AnyBuffer>()  // packed
                                  .Ret<ffi::AnyBuffer>()  // absmax
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4DequantizeCuda, jax_nf4::DequantizeCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // packed
                                  .Arg<ffi::AnyBuffer>()  // absmax
                                  .Ret<ffi::AnyBuffer>()  // w
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4DequantizeDqCuda, jax_nf4::DequantizeDqCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // packed
                                  .Arg<ffi::AnyBuffer>()  // absmax codes
                                  .Arg<ffi::AnyBuffer>()  // nested_absmax
                                  .Arg<ffi::AnyBuffer>()  // table
                                  .Arg<ffi::AnyBuffer>()  // offset
                                  .Ret<ffi::AnyBuffer>()  // w
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4MatmulDqCuda, jax_nf4::MatmulDqCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // packed
                                  .Arg<ffi::AnyBuffer>()  // absmax codes
                                  .Arg<ffi::AnyBuffer>()  // nested_absmax
                                  .Arg<ffi::AnyBuffer>()  // table
                                  .Arg<ffi::AnyBuffer>()  // offset
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxNf4MatmulCuda, jax_nf4::MatmulCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // packed
                                  .Arg<ffi::AnyBuffer>()  // absmax
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int64_t>("block_size"),
                              {ffi::Traits::kCmdBufferCompatible});
