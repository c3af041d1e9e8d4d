// Plain data shared by every kernel of the extension (CUDA in csrc/*.cu, CPU in csrc/cpu/) and
// their PyTorch bindings: parameter and reference types, the tensor lists of one op call and the
// scalars of each step.
//
// Free of torch and CUDA headers, so that it compiles with plain nvcc, plain g++, and in every
// per-instruction-set variant of the CPU kernels.
#pragma once

#include <cstdint>
#include <type_traits>

namespace cnl {

// float64 parameters are stepped in float64, with float64 states, by the CPU and the CUDA kernels.
enum class ParamType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// The type a step computes in for parameters stored as T (float, double, or a 16-bit type): double for
// double (with double optimizer states: no downcast anywhere), float for the others.
template <typename T>
using Compute = std::conditional_t<std::is_same_v<T, double>, double, float>;

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
  // float64 [count, 3] (row i: collaborative count, sum s collaborative, sum s conflicting)
  // that the op adds to, or nullptr. Needs `references`.
  double* stats = nullptr;
  // CUDA only: device workspace of 3 * num_chunks(numels, count) doubles when `stats` is set: one partial
  // row per block, summed per tensor in a fixed order (deterministic, no float atomics).
  double* partials = nullptr;  // Issue 22's terms of a step (cnl_ext/ops/rules.py), added to the gradient after maximize's sign and
  // before the L2 weight decay, each operation rounded on its own in the compute type:
  //   g <- g - c*r               with `project` (A-GEM): the references project and mask nothing
  //   g <- g + (2*lambda)*(F*(p - anchor))   with `fishers` (EWC): F float32, anchor in the param dtype
  // (c and 2*lambda rounded once from double to the compute type; the CUDA kernels take them in their
  // scalars, SgdScalarsT / AdamScalarsT).
  void* const* fishers = nullptr;
  void* const* anchors = nullptr;
  double ewc_two_lambda = 0.0;
  bool project = false;
  double agem_coefficient = 0.0;
};

// Kernel scalars, in the compute type C of the step: float for float32, bfloat16 and float16
// parameters, double for float64 ones. Derived constants (1 - dampening, 1 - lr*wd, lr*wd,
// sqrt(bias_correction2), the step size lr / bias_correction1) are computed on the host in double and
// rounded once to C, as torch.optim does with Python floats. With a device lr or device step counts the
// kernels compute them in C instead (the definition: cnl_ext/optim/adam.py).
template <typename C>
struct SgdScalarsT {
  C lr;
  const float* lr_ptr;  // capturable: lr read from this 0-d device tensor (nullptr: use `lr`)
  C weight_decay;
  C momentum;
  C one_minus_dampening;
  bool has_weight_decay;
  bool has_momentum;
  bool first_step;
  bool nesterov;
  bool maximize;
  // Issue 22's terms in the CUDA kernels (the CPU kernels read them from TensorLists): 2*lambda and c
  // rounded once to C, and whether each applies.
  C ewc_two_lambda{};
  C agem_coefficient{};
  bool ewc = false;
  bool project = false;
};

template <typename C>
struct AdamScalarsT {
  C lr;
  const float* lr_ptr;  // capturable: lr read from this 0-d device tensor (nullptr: use `lr`)
  C beta1;
  C beta2;
  C one_minus_beta1;
  C one_minus_beta2;
  C eps;
  C weight_decay;
  C one_minus_lr_wd;  // decoupled decay factor 1 - lr*wd (host lr only)
  C lr_weight_decay;  // lr*wd, the decay's share of lr*u (host lr only)
  C bias_correction1;       // unused with TensorLists::steps
  C bias_correction2_sqrt;  // unused with TensorLists::steps
  C step_size;              // lr / bias_correction1 (host lr and bias corrections only)
  bool l2_weight_decay;         // weight_decay != 0 and not decoupled: g += wd*p
  bool decoupled_weight_decay;  // weight_decay != 0 and decoupled: u += wd*p, p *= 1 - lr*wd
  bool amsgrad;
  bool maximize;
  C ewc_two_lambda{};  // issue 22, as in SgdScalarsT
  C agem_coefficient{};
  bool ewc = false;
  bool project = false;
};

using SgdScalars = SgdScalarsT<float>;
using AdamScalars = AdamScalarsT<float>;

// KIF's per-element importance EMAs (cnl_ext/ops/importance.py defines them), which a step updates in
// the same pass from the new parameter as stored and the gradient as passed: one sensitivity and one
// uncertainty tensor per param (contiguous float32, as the bindings check).
enum class ImportanceKind : int { kFirst = 1, kParamMix = 2 };  // |w*g|, |w*g - (w*g)^2 / 2|

struct ImportanceScalars {
  ImportanceKind kind = ImportanceKind::kFirst;
  // 1 - beta computed on the host in double and rounded once, as the torch backend's Python floats.
  float beta1 = 0.0f, one_minus_beta1 = 1.0f, beta2 = 0.0f, one_minus_beta2 = 1.0f;
};

struct Importance {
  void* const* sensitivities = nullptr;  // host arrays of pointers, one entry per tensor
  void* const* uncertainties = nullptr;
  ImportanceScalars scalars;
};

}  // namespace cnl
