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
// KIF's EMAs, which the step then updates in the same pass. C is the step's compute type: double
// for float64 parameters (stepped in float64, with float64 states), float for the others; the
// kernels are instantiated for both (a parameter type of the other compute type is
// cudaErrorInvalidValue).
template <typename C>
cudaError_t launch_sgd_step(const TensorLists& lists, const SgdScalarsT<C>& scalars, const Importance* importance,
                            cudaStream_t stream);
template <typename C>
cudaError_t launch_adam_step(const TensorLists& lists, const AdamScalarsT<C>& scalars, const Importance* importance,
                             cudaStream_t stream);

// KIF's fusion passes (cnl_ext/ops/kif_fusion_torch.py): `lists` gives count, numels, params and
// param_type (nothing else is read); `anchor_type` is the dtype of the anchors (and inner ends).
// Task vector: `units` is a device array of (offset, div, mod) per tensor of the op's lists: element f
// of tensor i takes coefficients[offset + (f / div) % mod] (device float32).
cudaError_t launch_task_vector_fuse(const TensorLists& lists, ParamType anchor_type, void* const* anchors,
                                    const float* coefficients, const int64_t* units, cudaStream_t stream);

// Recurrent-KIF: `columns` holds anchors, inner ends, then the float32 S_in, U_in, S_out, U_out.
struct RecurrentScalars {
  float delta_in, delta_out;  // the thresholds, rounded to float32 (as the torch backend's tensors)
  bool paper_rule;            // the binary masks of Eq 9, else the authors' weights
  bool update_anchors;        // then anchors <- params as stored
};
constexpr int kRecurrentColumns = 6;
cudaError_t launch_recurrent_fuse(const TensorLists& lists, ParamType anchor_type,
                                  void* const* const (&columns)[kRecurrentColumns], const RecurrentScalars& scalars,
                                  cudaStream_t stream);

}  // namespace cnl
