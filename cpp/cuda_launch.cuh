// The CUDA handlers' kernel launch, optionally as thread-block clusters (host code).
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace jax_nf4 {

// kernel<<<grid, block, shared_bytes, stream>>>(args...), its blocks in thread-block clusters
// of `cluster` consecutive blocks along x where cluster > 0 (sm_90), then the launch's error.
template <typename... Params, typename... Args>
cudaError_t LaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                         cudaStream_t stream, unsigned cluster, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = cluster > 0 ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  return err == cudaSuccess ? cudaGetLastError() : err;
}

}  // namespace jax_nf4
