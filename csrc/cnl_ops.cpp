// PyTorch bindings of the CUDA CNL steps: torch.ops.cnl_ext.sgd_step_ and torch.ops.cnl_ext.adam_step_.
//
// The ops follow the contract of cnl_ext/ops/__init__.py (same arguments as the Triton module).
// Their schemas declare every list they write (Tensor(a!)[]), so torch.compile functionalizes them
// correctly; the Meta kernels (no-ops: the ops return nothing and change no metadata) let them be
// traced with fake tensors. Unlike the Python backends, this binding re-checks its inputs: a wrong
// pointer here is a silent memory corruption, so every mismatch is a TORCH_CHECK with a message.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "cnl_common.h"

namespace {

using at::Tensor;
using at::TensorList;

// The arguments of the ops contract, in its order, plus `lr_tensor`: a capturable step passes its
// learning rate as a 0-d float32 device tensor there (the Python wrapper moves a tensor `lr` to it;
// `lr` is then ignored). tests/test_cuda_backend.py parses these strings (CPU test).
constexpr const char* kSgdSchema =
    "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[]? momentum_buffers, Tensor[]? references, "
    "Tensor(c!)? stats, *, str reference_format, float lr, float weight_decay, float momentum, "
    "float dampening, bool nesterov, bool maximize, bool first_step, Tensor? lr_tensor=None) -> ()";
constexpr const char* kAdamSchema =
    "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[]? max_exp_avg_sqs, Tensor[]? references, Tensor(e!)? stats, *, str reference_format, "
    "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
    "bool amsgrad, bool maximize, float? bias_correction1=None, float? bias_correction2=None, "
    "Tensor[]? device_steps=None, Tensor? lr_tensor=None) -> ()";

cnl::RefFormat parse_format(c10::string_view name, const char* op) {
  if (name == "float32") return cnl::RefFormat::kFloat32;
  if (name == "bfloat16") return cnl::RefFormat::kBFloat16;
  if (name == "int8") return cnl::RefFormat::kInt8;
  if (name == "sign2") return cnl::RefFormat::kSign2;
  TORCH_CHECK(false, op, ": reference_format must be one of 'float32', 'bfloat16', 'int8', 'sign2', got '",
              std::string(name), "'");
}

// The dtype a stored reference has in each format (cnl_ext/reference_format.py).
at::ScalarType reference_dtype(cnl::RefFormat format) {
  switch (format) {
    case cnl::RefFormat::kFloat32: return at::kFloat;
    case cnl::RefFormat::kBFloat16: return at::kBFloat16;
    case cnl::RefFormat::kInt8: return at::kChar;
    default: return at::kByte;  // sign2
  }
}

cnl::ParamType param_type(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat: return cnl::ParamType::kFloat32;
    case at::kBFloat16: return cnl::ParamType::kBFloat16;
    case at::kHalf: return cnl::ParamType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": parameters must be float32, bfloat16 or float16, got ", dtype);
  }
}

// Validated op inputs as the host arrays the launchers take. The vectors own the pointer arrays
// for the duration of the (asynchronous) launch call only: kernels receive the pointers by value.
struct Collected {
  std::vector<int64_t> numels;
  std::vector<void*> params, grads, states[3], references;
  cnl::TensorLists lists;
  Tensor partials;  // keeps the workspace alive until the kernels are enqueued (caching allocator)
};

void check_tensor(const Tensor& t, const char* op, const char* list, size_t i, const Tensor& param,
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

std::vector<void*> pointers_of(TensorList list, const char* op, const char* name, TensorList params,
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

void collect(Collected& c, const char* op, TensorList params, TensorList grads,
             const std::optional<TensorList>& references, const std::optional<Tensor>& stats,
             c10::string_view reference_format) {
  TORCH_CHECK(!params.empty(), op, ": params is empty");
  const Tensor& first = params[0];
  TORCH_CHECK(first.defined() && first.is_cuda(), op, ": params must be CUDA tensors, params[0] is ",
              first.defined() ? first.device().str() : std::string("undefined"),
              " (on other devices use backend='torch', or 'triton')");
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
  c.grads = pointers_of(grads, op, "grads", params, dtype);
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == params[i].sizes(), op, ": grads[", i, "] has shape ", grads[i].sizes(),
                " but params[", i, "] has shape ", params[i].sizes());
  }
  c.lists.numels = c.numels.data();
  c.lists.params = c.params.data();
  c.lists.grads = c.grads.data();

  // The format is parsed (and must be valid) even without references, as in the Python backends.
  const cnl::RefFormat format = parse_format(reference_format, op);
  if (references.has_value()) {
    c.references = pointers_of(*references, op, "references", params, reference_dtype(format),
                               format == cnl::RefFormat::kSign2);
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
    const int64_t chunks = cnl::num_chunks(c.numels.data(), c.lists.count);
    c.partials = at::empty({std::max<int64_t>(3 * chunks, 1)}, first.options().dtype(at::kDouble));
    c.lists.partials = c.partials.data_ptr<double>();
  }
}

void set_states(Collected& c, int column, const std::optional<TensorList>& states, const char* op,
                const char* name, TensorList params) {
  if (!states.has_value()) return;
  c.states[column] = pointers_of(*states, op, name, params, at::kFloat);
  c.lists.states[column] = c.states[column].data();
}

// A 0-d (or one-element) float32 tensor on the params' device, read by the kernels.
const float* device_scalar(const Tensor& t, const char* op, const std::string& name, const Tensor& param) {
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, " must be on the params' device ", param.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have one element, got shape ", t.sizes());
  return t.const_data_ptr<float>();
}

const float* lr_pointer(const std::optional<Tensor>& lr_tensor, const char* op, const Tensor& param) {
  if (!lr_tensor.has_value() || !lr_tensor->defined()) return nullptr;
  return device_scalar(*lr_tensor, op, "lr_tensor", param);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void sgd_step_cuda(TensorList params, TensorList grads, const std::optional<TensorList>& momentum_buffers,
                   const std::optional<TensorList>& references, const std::optional<Tensor>& stats,
                   c10::string_view reference_format, double lr, double weight_decay, double momentum,
                   double dampening, bool nesterov, bool maximize, bool first_step,
                   const std::optional<Tensor>& lr_tensor) {
  constexpr const char* op = "cnl_ext.sgd_step_";
  Collected c;
  collect(c, op, params, grads, references, stats, reference_format);
  set_states(c, 0, momentum_buffers, op, "momentum_buffers", params);
  cnl::SgdScalars s;
  s.lr = static_cast<float>(lr);
  s.lr_ptr = lr_pointer(lr_tensor, op, params[0]);
  s.weight_decay = static_cast<float>(weight_decay);
  s.momentum = static_cast<float>(momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - dampening);
  s.has_weight_decay = weight_decay != 0.0;
  s.has_momentum = momentum_buffers.has_value();  // the contract: buffers given iff momentum != 0
  s.first_step = first_step;
  s.nesterov = nesterov;
  s.maximize = maximize;
  const c10::cuda::CUDAGuard guard(params[0].device());
  check_launch(cnl::launch_sgd_step(c.lists, s, c10::cuda::getCurrentCUDAStream().stream()), op);
}

void adam_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                    const std::optional<TensorList>& max_exp_avg_sqs, const std::optional<TensorList>& references,
                    const std::optional<Tensor>& stats, c10::string_view reference_format, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
                    bool maximize, std::optional<double> bias_correction1, std::optional<double> bias_correction2,
                    const std::optional<TensorList>& device_steps, const std::optional<Tensor>& lr_tensor) {
  constexpr const char* op = "cnl_ext.adam_step_";
  Collected c;
  collect(c, op, params, grads, references, stats, reference_format);
  set_states(c, 0, exp_avgs, op, "exp_avgs", params);
  set_states(c, 1, exp_avg_sqs, op, "exp_avg_sqs", params);
  if (amsgrad) {
    TORCH_CHECK(max_exp_avg_sqs.has_value(), op, ": amsgrad=True needs max_exp_avg_sqs");
    set_states(c, 2, max_exp_avg_sqs, op, "max_exp_avg_sqs", params);
  }
  std::vector<void*> steps;
  if (device_steps.has_value()) {
    TORCH_CHECK(device_steps->size() == params.size(), op, ": got ", params.size(), " params but ",
                device_steps->size(), " device_steps");
    steps.resize(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      steps[i] = const_cast<float*>(device_scalar((*device_steps)[i], op, "device_steps[" + std::to_string(i) + "]",
                                                  params[0]));
    }
    c.lists.steps = steps.data();
  } else {
    TORCH_CHECK(bias_correction1.has_value() && bias_correction2.has_value(), op,
                ": bias_correction1 and bias_correction2 are needed without device_steps");
    TORCH_CHECK(*bias_correction1 > 0.0 && *bias_correction2 > 0.0, op, ": bias corrections must be positive, got ",
                *bias_correction1, " and ", *bias_correction2);
  }
  cnl::AdamScalars s;
  s.lr = static_cast<float>(lr);
  s.lr_ptr = lr_pointer(lr_tensor, op, params[0]);
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.one_minus_lr_wd = static_cast<float>(1.0 - lr * weight_decay);
  s.bias_correction1 = static_cast<float>(bias_correction1.value_or(1.0));
  s.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2.value_or(1.0)));
  s.l2_weight_decay = weight_decay != 0.0 && !decoupled_weight_decay;
  s.decoupled_weight_decay = weight_decay != 0.0 && decoupled_weight_decay;
  s.amsgrad = amsgrad;
  s.maximize = maximize;
  const c10::cuda::CUDAGuard guard(params[0].device());
  check_launch(cnl::launch_adam_step(c.lists, s, c10::cuda::getCurrentCUDAStream().stream()), op);
}

// Meta / fake-tensor kernels: nothing to compute, no metadata changes, nothing returned.
void sgd_step_meta(TensorList, TensorList, const std::optional<TensorList>&, const std::optional<TensorList>&,
                   const std::optional<Tensor>&, c10::string_view, double, double, double, double, bool, bool,
                   bool, const std::optional<Tensor>&) {}

void adam_step_meta(TensorList, TensorList, TensorList, TensorList, const std::optional<TensorList>&,
                    const std::optional<TensorList>&, const std::optional<Tensor>&, c10::string_view, double, double,
                    double, double, double, bool, bool, bool, std::optional<double>, std::optional<double>,
                    const std::optional<TensorList>&, const std::optional<Tensor>&) {}

}  // namespace

TORCH_LIBRARY(cnl_ext, m) {
  m.def(kSgdSchema);
  m.def(kAdamSchema);
}

TORCH_LIBRARY_IMPL(cnl_ext, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adam_step_", &adam_step_cuda);
}

// CPU tensors reach the same functions, whose first check explains that the ops need CUDA tensors
// (instead of the dispatcher's generic "could not run ... with arguments from the 'CPU' backend").
TORCH_LIBRARY_IMPL(cnl_ext, CPU, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adam_step_", &adam_step_cuda);
}

TORCH_LIBRARY_IMPL(cnl_ext, Meta, m) {
  m.impl("sgd_step_", &sgd_step_meta);
  m.impl("adam_step_", &adam_step_meta);
}

// `import cnl_ext._C` loads this library, which runs the registrations above. The module itself
// only carries build information for cnl_ext.ops.cuda_step.build_info().
// setup.py passes the architectures as a bare token (8.0;9.0+PTX -> 80_90PTX), stringified here.
#ifndef CNL_EXT_CUDA_ARCHS
#define CNL_EXT_CUDA_ARCHS unknown
#endif
#define CNL_EXT_STRINGIFY_(x) #x
#define CNL_EXT_STRINGIFY(x) CNL_EXT_STRINGIFY_(x)

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "cnl_ext CUDA kernels; the ops are torch.ops.cnl_ext.sgd_step_ and adam_step_.",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "cuda_runtime_version", CUDART_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", CNL_EXT_STRINGIFY(CNL_EXT_CUDA_ARCHS)) < 0 ||
      PyModule_AddIntConstant(m, "chunk_size", static_cast<long>(cnl::kChunkSize)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
