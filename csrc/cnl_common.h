// Host interface between the PyTorch bindings (cnl_ops.cpp) and the CUDA kernels (cnl_*.cu).
//
// Deliberately free of torch headers: the .cu files compile with plain nvcc and the CUDA headers
// (scripts/check_cuda_compile.sh does exactly that on machines without a GPU or a CUDA torch), and
// all torch-dependent code stays in the .cpp file.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace cnl {

// Each CUDA block owns one chunk of kChunkSize elements of one tensor (Apex multi_tensor_apply
// layout). A multiple of kVec, so every chunk starts on a vector boundary.
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockThreads = 512;
// Elements per thread per vector access: 16 bytes of float32 state, 8 bytes of bf16/fp16, one
// byte of 2-bit packed signs.
constexpr int kVec = 4;

enum class ParamType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Storage of the reference gradient (see cnl_ext/reference_format.py).
enum class RefFormat : int { kNone = 0, kFloat32 = 1, kBFloat16 = 2, kInt8 = 3, kSign2 = 4 };

// The tensors of one op call, as host arrays of device pointers (one entry per tensor). A column
// the options do not use is nullptr (the whole array, not its entries).
struct TensorLists {
  int64_t count = 0;
  const int64_t* numels = nullptr;
  void* const* params = nullptr;
  void* const* grads = nullptr;
  void* const* states[3] = {nullptr, nullptr, nullptr};  // SGD: momentum; Adam: m, v, vmax
  void* const* references = nullptr;
  // Adam only, capturable: per tensor a 0-d float32 device step count (already incremented); the
  // bias corrections are then computed on the device from it.
  void* const* steps = nullptr;
  ParamType param_type = ParamType::kFloat32;
  RefFormat ref_format = RefFormat::kNone;
  // Device float64 [count, 3] (row i: collaborative count, sum s collaborative, sum s conflicting)
  // that the op adds to, or nullptr. Needs `references`.
  double* stats = nullptr;
  // Device workspace of 3 * num_chunks(numels, count) doubles when `stats` is set: one partial
  // row per block, summed per tensor in a fixed order (deterministic, no float atomics).
  double* partials = nullptr;
};

// Kernel scalars. Derived constants (1 - dampening, 1 - lr*wd, sqrt(bias_correction2)) are
// computed on the host in double and rounded once, as torch.optim does with Python floats.
struct SgdScalars {
  float lr;
  const float* lr_ptr;  // capturable: lr read from this 0-d device tensor (nullptr: use `lr`)
  float weight_decay;
  float momentum;
  float one_minus_dampening;
  bool has_weight_decay;
  bool has_momentum;
  bool first_step;
  bool nesterov;
  bool maximize;
};

struct AdamScalars {
  float lr;
  const float* lr_ptr;  // capturable: lr read from this 0-d device tensor (nullptr: use `lr`)
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float one_minus_lr_wd;  // decoupled decay factor 1 - lr*wd (host lr only)
  float bias_correction1;       // unused with TensorLists::steps
  float bias_correction2_sqrt;  // unused with TensorLists::steps
  bool l2_weight_decay;         // weight_decay != 0 and not decoupled: g += wd*p
  bool decoupled_weight_decay;  // weight_decay != 0 and decoupled: u += wd*p, p *= 1 - lr*wd
  bool amsgrad;
  bool maximize;
};

// Number of blocks (chunks) of all tensors: the size of `partials` is 3 times this.
inline int64_t num_chunks(const int64_t* numels, int64_t count) {
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) total += (numels[i] + kChunkSize - 1) / kChunkSize;
  return total;
}

// Enqueue the step on `stream`. No host synchronization, no allocation. Returns the first CUDA
// error (launch configuration, invalid arguments), cudaSuccess otherwise.
cudaError_t launch_sgd_step(const TensorLists& lists, const SgdScalars& scalars, cudaStream_t stream);
cudaError_t launch_adam_step(const TensorLists& lists, const AdamScalars& scalars, cudaStream_t stream);

}  // namespace cnl
