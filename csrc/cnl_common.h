// Host interface between the PyTorch bindings (cnl_ops.cpp) and the CUDA kernels (cnl_*.cu).
// The types they share with the CPU kernels are in cnl_types.h.
//
// Deliberately free of torch headers: the .cu files compile with plain nvcc and the CUDA headers
// (scripts/check_cuda_compile.sh does exactly that on machines without a GPU or a CUDA torch), and
// all torch-dependent code stays in the .cpp file.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cnl_types.h"

namespace cnl {

// Each CUDA block owns one chunk of kChunkSize elements of one tensor (Apex multi_tensor_apply
// layout). A multiple of kVec, so every chunk starts on a vector boundary.
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockThreads = 512;
// Elements per thread per vector access: 16 bytes of float32 state, 8 bytes of bf16/fp16, one
// byte of 2-bit packed signs.
constexpr int kVec = 4;

// Number of blocks (chunks) of all tensors: the size of `partials` is 3 times this.
inline int64_t num_chunks(const int64_t* numels, int64_t count) {
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) total += (numels[i] + kChunkSize - 1) / kChunkSize;
  return total;
}

// Enqueue the step on `stream`. No host synchronization, no allocation. Returns the first CUDA
// error (launch configuration, invalid arguments), cudaSuccess otherwise. `importance`: nullptr, or
// KIF's EMAs, which the step then updates in the same pass.
cudaError_t launch_sgd_step(const TensorLists& lists, const SgdScalars& scalars, const Importance* importance,
                            cudaStream_t stream);
cudaError_t launch_adam_step(const TensorLists& lists, const AdamScalars& scalars, const Importance* importance,
                             cudaStream_t stream);

}  // namespace cnl
