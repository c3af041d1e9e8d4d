// What the PyTorch bindings of the CPU (csrc/cpu/cnl_cpu_ops.cpp, cnl_cpu_kif.cpp) and CUDA
// (csrc/cnl_ops.cpp) kernels share: the operator schemas, the validation of op inputs into
// cnl::TensorLists, and the step ops themselves (StepOps, over each library's launches).
//
// The ops follow the contract of cnl_ext/ops/__init__.py. Their schemas declare every list they
// write (Tensor(a!)[]), so torch.compile functionalizes them correctly. Unlike the Python backends,
// the bindings re-check their inputs: a wrong pointer here is a silent memory corruption, so every
// mismatch is a TORCH_CHECK with a message.
//
// Header-only on purpose: each CPU variant library (one per instruction set) compiles its own copy
// with its own flags, so no function compiled for one instruction set is shared with another.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "cnl_types.h"

namespace cnl::binding {

using at::Tensor;
using at::TensorList;

// The arguments of the ops contract (cnl_ext/ops/contract.py), in its order, plus `lr_tensor`: a
// capturable step passes its learning rate as a 0-d float32 tensor on the params' device there (the
// Python wrapper moves a tensor `lr` to it; `lr` is then ignored), and KIF's importance EMAs
// (cnl_ext/ops/importance.py) as optional lists: float32, shaped like the params, updated in the same
// pass where given, then issue 22's terms (EWC's F and anchor lists with lambda, A-GEM's coefficient:
// cnl_ext/ops/rules.py; TensorLists says how the kernels apply them). tests/ops/test_cuda_backend.py
// parses these strings.
constexpr const char* kSgdSchema =
    "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[]? momentum_buffers, Tensor[]? references, "
    "Tensor(c!)? stats, *, str reference_format, float lr, float weight_decay, float momentum, "
    "float dampening, bool nesterov, bool maximize, bool first_step, Tensor? lr_tensor=None, "
    "Tensor(s!)[]? sensitivities=None, Tensor(u!)[]? uncertainties=None, str importance_kind='first', "
    "float importance_beta1=0.85, float importance_beta2=0.85, Tensor[]? ewc_fishers=None, "
    "Tensor[]? ewc_anchors=None, float ewc_lambda=0.0, float? agem_coefficient=None) -> ()";
constexpr const char* kAdamSchema =
    "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[]? max_exp_avg_sqs, Tensor[]? references, Tensor(e!)? stats, *, str reference_format, "
    "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
    "bool amsgrad, bool maximize, float? bias_correction1=None, float? bias_correction2=None, "
    "Tensor[]? device_steps=None, Tensor? lr_tensor=None, Tensor(s!)[]? sensitivities=None, "
    "Tensor(u!)[]? uncertainties=None, str importance_kind='first', float importance_beta1=0.85, "
    "float importance_beta2=0.85, Tensor[]? ewc_fishers=None, Tensor[]? ewc_anchors=None, float ewc_lambda=0.0, "
    "float? agem_coefficient=None) -> ()";
// A-GEM's reduction (cnl_ext/ops/rules.py): out[i] += sum of grads[i] * references[i] (products in the
// compute type, sums in double in a fixed order). CPU only.
constexpr const char* kAgemDotSchema =
    "agem_dot_(Tensor[] grads, Tensor[] references, Tensor(a!) out, *, str reference_format) -> ()";
constexpr const char* kMaskedDeltaSchema =
    "masked_delta_(Tensor(a!)[] params, Tensor[] befores, Tensor[] references, Tensor(b!)? stats, *, "
    "str reference_format, float inv_lr) -> ()";

// The Meta / fake-tensor kernel of every op: nothing to compute, no metadata changes, nothing
// returned. Boxed, so that one function takes every schema: the arguments are only dropped.
inline void meta_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  torch::jit::drop(*stack, op.schema().arguments().size());
}

inline RefFormat parse_format(c10::string_view name, const char* op) {
  if (name == "float32") return RefFormat::kFloat32;
  if (name == "bfloat16") return RefFormat::kBFloat16;
  if (name == "int8") return RefFormat::kInt8;
  if (name == "sign2") return RefFormat::kSign2;
  TORCH_CHECK(false, op, ": reference_format must be one of 'float32', 'bfloat16', 'int8', 'sign2', got '",
              std::string(name), "'");
}

// The dtype a stored reference has in each format (cnl_ext/reference_format.py).
inline at::ScalarType reference_dtype(RefFormat format) {
  switch (format) {
    case RefFormat::kFloat32: return at::kFloat;
    case RefFormat::kBFloat16: return at::kBFloat16;
    case RefFormat::kInt8: return at::kChar;
    default: return at::kByte;  // sign2
  }
}

inline ParamType param_type(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat: return ParamType::kFloat32;
    case at::kBFloat16: return ParamType::kBFloat16;
    case at::kHalf: return ParamType::kFloat16;
    case at::kDouble: return ParamType::kFloat64;
    default:
      TORCH_CHECK(false, op, ": parameters must be float32, bfloat16, float16 or float64, got ", dtype);
  }
}

// The dtype of the optimizer states: float64 for float64 parameters, float32 for the others.
inline at::ScalarType state_dtype(ParamType param) {
  return param == ParamType::kFloat64 ? at::kDouble : at::kFloat;
}

// Validated op inputs as the host arrays the kernels take. The vectors own the pointer arrays for
// the duration of the op call only.
struct Collected {
  std::vector<int64_t> numels;
  std::vector<void*> params, grads, states[3], references, steps, fishers, anchors;
  TensorLists lists;
  Tensor partials;  // CUDA: keeps the statistics workspace alive until the kernels are enqueued
};

inline void check_tensor(const Tensor& t, const char* op, const char* list, size_t i, const Tensor& param,
                         at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == param.device(), op, ": ", list, "[", i, "] is on ", t.device(),
              " but params are on ", param.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", list, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
              dtype);
  TORCH_CHECK(t.numel() == numel, op, ": ", list, "[", i, "] has ", t.numel(), " elements, expected ", numel,
              " (params[", i, "] has shape ", param.sizes(), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", list, "[", i, "] must be contiguous");
}

inline std::vector<void*> pointers_of(TensorList list, const char* op, const char* name, TensorList params,
                                      at::ScalarType dtype, bool packed_signs = false) {
  TORCH_CHECK(list.size() == params.size(), op, ": got ", params.size(), " params but ", list.size(), " ", name);
  std::vector<void*> out(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const int64_t n = params[i].numel();
    check_tensor(list[i], op, name, i, params[i], dtype, packed_signs ? (n + 3) / 4 : n);
    out[i] = list[i].data_ptr();
  }
  return out;
}

// Checks params, grads (or any second list shaped and typed like the params: `grads_name` says
// which), references and stats; fills c.lists except the optimizer states. `device_type` is the
// device the kernels run on; `other_backends` completes the error for tensors elsewhere.
inline void collect(Collected& c, const char* op, c10::DeviceType device_type, const char* other_backends,
                    TensorList params, TensorList grads, const char* grads_name,
                    const std::optional<TensorList>& references, const std::optional<Tensor>& stats,
                    c10::string_view reference_format) {
  TORCH_CHECK(!params.empty(), op, ": params is empty");
  const Tensor& first = params[0];
  TORCH_CHECK(first.defined() && first.device().type() == device_type, op, ": params must be ",
              c10::DeviceTypeName(device_type), " tensors here, params[0] is ",
              first.defined() ? first.device().str() : std::string("undefined"), " (", other_backends, ")");
  const at::ScalarType dtype = first.scalar_type();
  c.lists.param_type = param_type(dtype, op);
  c.lists.count = static_cast<int64_t>(params.size());
  c.numels.resize(params.size());
  c.params.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_tensor(params[i], op, "params", i, first, dtype, params[i].numel());
    c.numels[i] = params[i].numel();
    c.params[i] = params[i].data_ptr();
  }
  c.grads = pointers_of(grads, op, grads_name, params, dtype);
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == params[i].sizes(), op, ": ", grads_name, "[", i, "] has shape ",
                grads[i].sizes(), " but params[", i, "] has shape ", params[i].sizes());
  }
  c.lists.numels = c.numels.data();
  c.lists.params = c.params.data();
  c.lists.grads = c.grads.data();

  // The format is parsed (and must be valid) even without references, as in the Python backends.
  const RefFormat format = parse_format(reference_format, op);
  if (references.has_value()) {
    c.references = pointers_of(*references, op, "references", params, reference_dtype(format),
                               format == RefFormat::kSign2);
    c.lists.references = c.references.data();
    c.lists.ref_format = format;
  }
  // Statistics are about the mask: without references there are none, and `stats` is left as it
  // is (as the Triton and PyTorch backends do).
  if (stats.has_value() && stats->defined() && references.has_value()) {
    const Tensor& s = *stats;
    TORCH_CHECK(s.device() == first.device(), op, ": stats is on ", s.device(), " but params are on ",
                first.device());
    TORCH_CHECK(s.scalar_type() == at::kDouble, op, ": stats must be float64, got ", s.scalar_type());
    TORCH_CHECK(s.dim() == 2 && s.size(0) == c.lists.count && s.size(1) == 3, op, ": stats must have shape [",
                c.lists.count, ", 3], got ", s.sizes());
    TORCH_CHECK(s.is_contiguous(), op, ": stats must be contiguous");
    c.lists.stats = s.data_ptr<double>();
  }
}

inline void set_states(Collected& c, int column, const std::optional<TensorList>& states, const char* op,
                       const char* name, TensorList params) {
  if (!states.has_value()) return;
  c.states[column] = pointers_of(*states, op, name, params, state_dtype(c.lists.param_type));
  c.lists.states[column] = c.states[column].data();
}

// A 0-d (or one-element) float32 tensor on the params' device, read by the kernels.
inline const float* device_scalar(const Tensor& t, const char* op, const std::string& name, const Tensor& param) {
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, " must be on the params' device ", param.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have one element, got shape ", t.sizes());
  return t.const_data_ptr<float>();
}

inline const float* lr_pointer(const std::optional<Tensor>& lr_tensor, const char* op, const Tensor& param) {
  if (!lr_tensor.has_value() || !lr_tensor->defined()) return nullptr;
  return device_scalar(*lr_tensor, op, "lr_tensor", param);
}

// The step's scalars in its compute type C (float, or double for float64 parameters).
template <typename C>
SgdScalarsT<C> sgd_scalars(const std::optional<TensorList>& momentum_buffers, double lr, double weight_decay,
                           double momentum, double dampening, bool nesterov, bool maximize, bool first_step,
                           const float* lr_ptr) {
  SgdScalarsT<C> s;
  s.lr = static_cast<C>(lr);
  s.lr_ptr = lr_ptr;
  s.weight_decay = static_cast<C>(weight_decay);
  s.momentum = static_cast<C>(momentum);
  s.one_minus_dampening = static_cast<C>(1.0 - dampening);
  s.has_weight_decay = weight_decay != 0.0;
  s.has_momentum = momentum_buffers.has_value();  // the contract: buffers given iff momentum != 0
  s.first_step = first_step;
  s.nesterov = nesterov;
  s.maximize = maximize;
  return s;
}

// Adam's states and step counts (capturable); fills c.lists.states / steps.
inline void adam_setup(Collected& c, const char* op, TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs,
                       const std::optional<TensorList>& max_exp_avg_sqs, bool amsgrad,
                       std::optional<double> bias_correction1, std::optional<double> bias_correction2,
                       const std::optional<TensorList>& device_steps) {
  set_states(c, 0, exp_avgs, op, "exp_avgs", params);
  set_states(c, 1, exp_avg_sqs, op, "exp_avg_sqs", params);
  if (amsgrad) {
    TORCH_CHECK(max_exp_avg_sqs.has_value(), op, ": amsgrad=True needs max_exp_avg_sqs");
    set_states(c, 2, max_exp_avg_sqs, op, "max_exp_avg_sqs", params);
  }
  if (device_steps.has_value()) {
    TORCH_CHECK(device_steps->size() == params.size(), op, ": got ", params.size(), " params but ",
                device_steps->size(), " device_steps");
    c.steps.resize(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      c.steps[i] = const_cast<float*>(
          device_scalar((*device_steps)[i], op, "device_steps[" + std::to_string(i) + "]", params[0]));
    }
    c.lists.steps = c.steps.data();
  } else {
    TORCH_CHECK(bias_correction1.has_value() && bias_correction2.has_value(), op,
                ": bias_correction1 and bias_correction2 are needed without device_steps");
    TORCH_CHECK(*bias_correction1 > 0.0 && *bias_correction2 > 0.0, op, ": bias corrections must be positive, got ",
                *bias_correction1, " and ", *bias_correction2);
  }
}

// Adam's scalars in the step's compute type C (float, or double for float64 parameters).
template <typename C>
AdamScalarsT<C> adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                             bool decoupled_weight_decay, bool amsgrad, bool maximize,
                             std::optional<double> bias_correction1, std::optional<double> bias_correction2,
                             const float* lr_ptr) {
  AdamScalarsT<C> s;
  s.lr = static_cast<C>(lr);
  s.lr_ptr = lr_ptr;
  s.beta1 = static_cast<C>(beta1);
  s.beta2 = static_cast<C>(beta2);
  s.one_minus_beta1 = static_cast<C>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<C>(1.0 - beta2);
  s.eps = static_cast<C>(eps);
  s.weight_decay = static_cast<C>(weight_decay);
  s.one_minus_lr_wd = static_cast<C>(1.0 - lr * weight_decay);
  s.bias_correction1 = static_cast<C>(bias_correction1.value_or(1.0));
  s.bias_correction2_sqrt = static_cast<C>(std::sqrt(bias_correction2.value_or(1.0)));
  s.lr_weight_decay = static_cast<C>(lr * weight_decay);
  s.step_size = static_cast<C>(lr / bias_correction1.value_or(1.0));
  s.l2_weight_decay = weight_decay != 0.0 && !decoupled_weight_decay;
  s.decoupled_weight_decay = weight_decay != 0.0 && decoupled_weight_decay;
  s.amsgrad = amsgrad;
  s.maximize = maximize;
  return s;
}

// The importance arguments of the step ops: KIF's EMAs (none: no importance) and their options.
struct ImportanceArgs {
  const std::optional<TensorList>& sensitivities;
  const std::optional<TensorList>& uncertainties;
  c10::string_view kind;
  double beta1, beta2;
};

// ImportanceArgs validated (contiguous float32 tensors shaped like the params, on their device) as
// the kernels take them; the vectors own the pointer arrays for the duration of the op call.
struct CollectedImportance {
  std::vector<void*> sensitivities, uncertainties;
  Importance importance;
  bool given = false;

  // nullptr without importance: the kernels without the EMAs
  const Importance* get() const { return given ? &importance : nullptr; }
};

inline std::vector<void*> importance_pointers(TensorList list, const char* op, const char* name, TensorList params) {
  std::vector<void*> out = pointers_of(list, op, name, params, at::kFloat);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(list[i].sizes() == params[i].sizes(), op, ": ", name, "[", i, "] has shape ", list[i].sizes(),
                " but params[", i, "] has shape ", params[i].sizes());
  }
  return out;
}

// After collect() has checked the params.
inline void collect_importance(CollectedImportance& c, const char* op, TensorList params, const ImportanceArgs& args) {
  TORCH_CHECK(args.sensitivities.has_value() == args.uncertainties.has_value(), op,
              ": give both sensitivities and uncertainties (KIF's importance EMAs), or neither");
  if (!args.sensitivities.has_value()) return;
  c.given = true;
  c.sensitivities = importance_pointers(*args.sensitivities, op, "sensitivities", params);
  c.uncertainties = importance_pointers(*args.uncertainties, op, "uncertainties", params);
  ImportanceScalars& s = c.importance.scalars;
  if (args.kind == "first") {
    s.kind = ImportanceKind::kFirst;
  } else if (args.kind == "param_mix") {
    s.kind = ImportanceKind::kParamMix;
  } else {
    TORCH_CHECK(false, op, ": importance_kind must be 'first' or 'param_mix', got '", std::string(args.kind), "'");
  }
  TORCH_CHECK(0.0 <= args.beta1 && args.beta1 < 1.0 && 0.0 <= args.beta2 && args.beta2 < 1.0, op,
              ": importance betas must lie in [0, 1), got (", args.beta1, ", ", args.beta2, ")");
  c.importance.sensitivities = c.sensitivities.data();
  c.importance.uncertainties = c.uncertainties.data();
  s.beta1 = static_cast<float>(args.beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - args.beta1);
  s.beta2 = static_cast<float>(args.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - args.beta2);
}

// Issue 22's arguments of the step ops, after collect(): EWC's lists (F float32 and the anchors in the
// params' dtype, both shaped like the params; used only with ewc_lambda != 0) and A-GEM's coefficient
// (given: the references, float32 or bfloat16, project the gradient and mask nothing; no statistics).
inline void collect_rules(Collected& c, const char* op, TensorList params, const std::optional<TensorList>& fishers,
                          const std::optional<TensorList>& anchors, double ewc_lambda,
                          std::optional<double> agem_coefficient) {
  TORCH_CHECK(fishers.has_value() == anchors.has_value(), op, ": give both ewc_fishers and ewc_anchors, or neither");
  TORCH_CHECK(std::isfinite(ewc_lambda) && ewc_lambda >= 0.0, op, ": ewc_lambda must be finite and >= 0, got ",
              ewc_lambda);
  if (fishers.has_value() && ewc_lambda != 0.0) {
    c.fishers = importance_pointers(*fishers, op, "ewc_fishers", params);
    c.anchors = pointers_of(*anchors, op, "ewc_anchors", params, params[0].scalar_type());
    c.lists.fishers = c.fishers.data();
    c.lists.anchors = c.anchors.data();
    c.lists.ewc_two_lambda = 2.0 * ewc_lambda;
  }
  if (agem_coefficient.has_value()) {
    TORCH_CHECK(std::isfinite(*agem_coefficient), op, ": agem_coefficient must be finite, got ", *agem_coefficient);
    const RefFormat format = c.lists.ref_format;
    TORCH_CHECK(format == RefFormat::kNone || format == RefFormat::kFloat32 || format == RefFormat::kBFloat16, op,
                ": A-GEM (agem_coefficient) needs float32 or bfloat16 references (the sign formats have no magnitudes)");
    c.lists.project = format != RefFormat::kNone;
    c.lists.agem_coefficient = *agem_coefficient;
    c.lists.stats = nullptr;  // nothing is masked: no statistics
  }
}

// ---------------------------------------------------------------------------- KIF's fusion ops

// The schemas of KIF's fusion passes (cnl_ext/ops/kif_fusion_torch.py defines them). Unit maps: element
// f of params[i] belongs to unit unit_offsets[i] + (f // unit_divs[i]) % unit_mods[i].
constexpr const char* kTaskVectorFuseSchema =
    "kif_task_vector_fuse_(Tensor(a!)[] params, Tensor[] anchors, Tensor coefficients, int[] unit_offsets, "
    "int[] unit_divs, int[] unit_mods) -> ()";
constexpr const char* kRecurrentFuseSchema =
    "kif_recurrent_fuse_(Tensor(a!)[] params, Tensor(b!)[] anchors, Tensor[] inner_ends, "
    "Tensor[] inner_sensitivities, Tensor[] inner_uncertainties, Tensor[] outer_sensitivities, "
    "Tensor[] outer_uncertainties, *, float delta_in, float delta_out, str rule, bool update_anchors) -> ()";

inline at::ScalarType fusion_dtype(const Tensor& t, const char* op, const char* name) {
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype);
  return dtype;
}

// Checks that `params` are contiguous tensors of one fusion dtype on a `device_type` device; returns
// their element counts. `other_backends` completes the error for tensors elsewhere.
inline std::vector<int64_t> fusion_params(TensorList params, const char* op, c10::DeviceType device_type,
                                          const char* other_backends) {
  TORCH_CHECK(!params.empty(), op, ": params is empty");
  const Tensor& first = params[0];
  TORCH_CHECK(first.defined() && first.device().type() == device_type, op, ": params must be ",
              c10::DeviceTypeName(device_type), " tensors here, params[0] is ",
              first.defined() ? first.device().str() : std::string("undefined"), " (", other_backends, ")");
  fusion_dtype(first, op, "params");
  std::vector<int64_t> numels(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_tensor(params[i], op, "params", i, first, first.scalar_type(), params[i].numel());
    numels[i] = params[i].numel();
  }
  return numels;
}

// Checks `list` against the params (one tensor each, as many elements, contiguous, on their device)
// with `dtype`, or with the dtype of its first tensor (a fusion dtype) when `dtype` is Undefined.
inline std::vector<void*> fusion_list(TensorList list, const char* op, const char* name, TensorList params,
                                      at::ScalarType dtype = at::ScalarType::Undefined) {
  TORCH_CHECK(list.size() == params.size(), op, ": got ", params.size(), " params but ", list.size(), " ", name);
  if (dtype == at::ScalarType::Undefined) {
    TORCH_CHECK(list[0].defined(), op, ": ", name, "[0] is undefined");
    dtype = fusion_dtype(list[0], op, name);
  }
  return pointers_of(list, op, name, params, dtype);
}

// The checks of kif_task_vector_fuse_'s coefficients (contiguous 1-D float32 on the params' device)
// and unit maps (every tensor's units within the coefficients).
inline void check_units(const Tensor& coefficients, const std::vector<int64_t>& numels, at::IntArrayRef offsets,
                        at::IntArrayRef divs, at::IntArrayRef mods, const char* op, const Tensor& param) {
  TORCH_CHECK(coefficients.defined() && coefficients.device() == param.device() &&
                  coefficients.scalar_type() == at::kFloat && coefficients.dim() == 1 && coefficients.is_contiguous(),
              op, ": coefficients must be a contiguous 1-D float32 tensor on the params' device ", param.device());
  const int64_t units = coefficients.numel();
  const size_t n = numels.size();
  TORCH_CHECK(offsets.size() == n && divs.size() == n && mods.size() == n, op, ": got ", n, " params but ",
              offsets.size(), " unit offsets, ", divs.size(), " divs, ", mods.size(), " mods");
  for (size_t i = 0; i < n; ++i) {
    if (numels[i] == 0) continue;
    TORCH_CHECK(divs[i] >= 1 && mods[i] >= 1 && offsets[i] >= 0 && offsets[i] + mods[i] <= units, op,
                ": the units of params[", i, "] (offset ", offsets[i], ", div ", divs[i], ", mod ", mods[i],
                ") do not lie within the ", units, " coefficients");
  }
}

inline void check_recurrent_options(c10::string_view rule, double delta_in, double delta_out, const char* op) {
  TORCH_CHECK(rule == "code" || rule == "paper", op, ": rule must be 'code' or 'paper', got '", std::string(rule),
              "'");
  TORCH_CHECK(!std::isnan(delta_in) && !std::isnan(delta_out), op, ": a fusion threshold is NaN");
}

// ---------------------------------------------------------------------------- the step ops

// The step ops of the schemas above, for one library's kernels: validate everything, then call
// Kernels::sgd / Kernels::adam (c, scalars, importance or nullptr, op, params[0]), with the scalars
// in the step's compute type (SgdScalarsT<double> / AdamScalarsT<double> for float64 parameters, else
// <float>). `Kernels` also gives kDevice (the device type of its tensors) and kOtherBackends (completes
// the error for others).
template <class Kernels>
struct StepOps {
  static void sgd_step(TensorList params, TensorList grads, const std::optional<TensorList>& momentum_buffers,
                       const std::optional<TensorList>& references, const std::optional<Tensor>& stats,
                       c10::string_view reference_format, double lr, double weight_decay, double momentum,
                       double dampening, bool nesterov, bool maximize, bool first_step,
                       const std::optional<Tensor>& lr_tensor, const std::optional<TensorList>& sensitivities,
                       const std::optional<TensorList>& uncertainties, c10::string_view importance_kind,
                       double importance_beta1, double importance_beta2, const std::optional<TensorList>& ewc_fishers,
                       const std::optional<TensorList>& ewc_anchors, double ewc_lambda,
                       std::optional<double> agem_coefficient) {
    constexpr const char* op = "cnl_ext.sgd_step_";
    Collected c;
    collect(c, op, Kernels::kDevice, Kernels::kOtherBackends, params, grads, "grads", references, stats,
            reference_format);
    set_states(c, 0, momentum_buffers, op, "momentum_buffers", params);
    const float* lr_ptr = lr_pointer(lr_tensor, op, params[0]);
    CollectedImportance imp;
    collect_importance(imp, op, params,
                       {sensitivities, uncertainties, importance_kind, importance_beta1, importance_beta2});
    collect_rules(c, op, params, ewc_fishers, ewc_anchors, ewc_lambda, agem_coefficient);
    if (c.lists.param_type == ParamType::kFloat64) {
      Kernels::sgd(c, sgd_scalars<double>(momentum_buffers, lr, weight_decay, momentum, dampening, nesterov,
                                          maximize, first_step, lr_ptr), imp.get(), op, params[0]);
    } else {
      Kernels::sgd(c, sgd_scalars<float>(momentum_buffers, lr, weight_decay, momentum, dampening, nesterov,
                                         maximize, first_step, lr_ptr), imp.get(), op, params[0]);
    }
  }

  static void adam_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                        const std::optional<TensorList>& max_exp_avg_sqs, const std::optional<TensorList>& references,
                        const std::optional<Tensor>& stats, c10::string_view reference_format, double lr, double beta1,
                        double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
                        bool maximize, std::optional<double> bias_correction1, std::optional<double> bias_correction2,
                        const std::optional<TensorList>& device_steps, const std::optional<Tensor>& lr_tensor,
                        const std::optional<TensorList>& sensitivities, const std::optional<TensorList>& uncertainties,
                        c10::string_view importance_kind, double importance_beta1, double importance_beta2,
                        const std::optional<TensorList>& ewc_fishers, const std::optional<TensorList>& ewc_anchors,
                        double ewc_lambda, std::optional<double> agem_coefficient) {
    constexpr const char* op = "cnl_ext.adam_step_";
    Collected c;
    collect(c, op, Kernels::kDevice, Kernels::kOtherBackends, params, grads, "grads", references, stats,
            reference_format);
    adam_setup(c, op, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad, bias_correction1, bias_correction2,
               device_steps);
    const float* lr_ptr = lr_pointer(lr_tensor, op, params[0]);
    CollectedImportance imp;
    collect_importance(imp, op, params,
                       {sensitivities, uncertainties, importance_kind, importance_beta1, importance_beta2});
    collect_rules(c, op, params, ewc_fishers, ewc_anchors, ewc_lambda, agem_coefficient);
    if (c.lists.param_type == ParamType::kFloat64) {
      Kernels::adam(c, adam_scalars<double>(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad,
                                            maximize, bias_correction1, bias_correction2, lr_ptr),
                    imp.get(), op, params[0]);
    } else {
      Kernels::adam(c, adam_scalars<float>(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad,
                                           maximize, bias_correction1, bias_correction2, lr_ptr),
                    imp.get(), op, params[0]);
    }
  }
};

}  // namespace cnl::binding
