// nanobind module `jax_nf4._nf4_cuda`: capsules of the CUDA FFI handlers in cuda_ops.cu and
// attention_cuda.cu.
#include "nanobind/nanobind.h"
#include "xla/ffi/api/api.h"

namespace nb = nanobind;

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxNf4QuantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxNf4DequantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxNf4MatmulCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxNf4DequantizeDqCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxNf4MatmulDqCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxNf4DecodeAttentionCuda);

namespace jax_nf4 {
bool HasWgmmaKernel();  // cuda_ops.cu
}

NB_MODULE(_nf4_cuda, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["nf4_quantize"] = nb::capsule(reinterpret_cast<void*>(JaxNf4QuantizeCuda));
    targets["nf4_dequantize"] = nb::capsule(reinterpret_cast<void*>(JaxNf4DequantizeCuda));
    targets["nf4_matmul"] = nb::capsule(reinterpret_cast<void*>(JaxNf4MatmulCuda));
    targets["nf4_dequantize_dq"] = nb::capsule(reinterpret_cast<void*>(JaxNf4DequantizeDqCuda));
    targets["nf4_matmul_dq"] = nb::capsule(reinterpret_cast<void*>(JaxNf4MatmulDqCuda));
    targets["decode_attention"] =
        nb::capsule(reinterpret_cast<void*>(JaxNf4DecodeAttentionCuda));
    return targets;
  });
  m.def("has_wgmma", &jax_nf4::HasWgmmaKernel,
        "Whether this build has the sm_90a wgmma matmul kernel (large M on H100 / H200).");
}
