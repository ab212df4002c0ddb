// CHECK(call) for the stand-alone CUDA programs under bench/: on an error, print the call,
// the line and the CUDA message, and exit with status 2 (usable inside helpers and lambdas).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                \
  do {                                                                          \
    cudaError_t e = (x);                                                        \
    if (e != cudaSuccess) {                                                     \
      std::fprintf(stderr, "%s:%d: %s\n", #x, __LINE__, cudaGetErrorString(e)); \
      std::exit(2);                                                             \
    }                                                                           \
  } while (0)
