// CHECK(call) for the stand-alone CUDA programs under bench/: on an error, print the call,
// the line and the CUDA message, and return 2 from main.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>

#define CHECK(x)                                                                \
  do {                                                                          \
    cudaError_t e = (x);                                                        \
    if (e != cudaSuccess) {                                                     \
      std::fprintf(stderr, "%s:%d: %s\n", #x, __LINE__, cudaGetErrorString(e)); \
      return 2;                                                                 \
    }                                                                           \
  } while (0)
