// The CPU library of the cnl_ext ops: it defines the operator schemas (TORCH_LIBRARY), registers
// the CPU kernels (cnl_cpu_kernels.cpp) and the Meta kernels, and is a Python module carrying its
// build information. The KIF fusion ops (cnl_cpu_kif.cpp) add their schemas and kernels to it.
//
// Compiled once per instruction set (DEFAULT, AVX2, AVX512) into its own library;
// cnl_ext.ops.native_backend loads exactly one per process (the one torch's CPU capability
// allows), before the CUDA library cnl_ext._C, which only adds CUDA kernels to these ops.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "cnl_binding.h"
#include "cnl_cpu_kernels.h"

namespace {

using at::Tensor;
using at::TensorList;
using cnl::binding::Collected;

// The CPU kernels of the step ops (cnl_binding.h's StepOps validates their inputs).
struct CpuSteps {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr const char* kOtherBackends = "CUDA tensors need cnl_ext._C; other devices use backend='torch'";
  template <typename C>
  static void sgd(Collected& c, const cnl::SgdScalarsT<C>& s, const cnl::Importance* importance, const char*,
                  const Tensor&) {
    cnl::cpu::sgd_step(c.lists, s, importance);
  }
  template <typename C>
  static void adam(Collected& c, const cnl::AdamScalarsT<C>& s, const cnl::Importance* importance, const char*,
                   const Tensor&) {
    cnl::cpu::adam_step(c.lists, s, importance);
  }
};
using Steps = cnl::binding::StepOps<CpuSteps>;

void masked_delta_cpu(TensorList params, TensorList befores, TensorList references,
                      const std::optional<Tensor>& stats, c10::string_view reference_format, double inv_lr) {
  constexpr const char* op = "cnl_ext.masked_delta_";
  Collected c;
  cnl::binding::collect(c, op, CpuSteps::kDevice, CpuSteps::kOtherBackends, params, befores, "befores",
                        std::optional<TensorList>(references), stats, reference_format);
  cnl::cpu::masked_delta(c.lists, inv_lr);
}

void agem_dot_cpu(TensorList grads, TensorList references, const Tensor& out, c10::string_view reference_format) {
  constexpr const char* op = "cnl_ext.agem_dot_";
  Collected c;
  cnl::binding::collect(c, op, CpuSteps::kDevice, CpuSteps::kOtherBackends, grads, grads, "grads",
                        std::optional<TensorList>(references), std::nullopt, reference_format);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kDouble && out.dim() == 1 &&
                  out.numel() == static_cast<int64_t>(grads.size()) && out.is_contiguous(),
              op, ": out must be a contiguous float64 CPU tensor of ", grads.size(), " elements, got ",
              out.scalar_type(), " ", out.sizes(), " on ", out.device());
  cnl::cpu::agem_dot(c.lists, out.data_ptr<double>());
}

}  // namespace

TORCH_LIBRARY(cnl_ext, m) {
  m.def(cnl::binding::kSgdSchema);
  m.def(cnl::binding::kAdamSchema);
  m.def(cnl::binding::kMaskedDeltaSchema);
  m.def(cnl::binding::kAgemDotSchema);
}

TORCH_LIBRARY_IMPL(cnl_ext, CPU, m) {
  m.impl("sgd_step_", &Steps::sgd_step);
  m.impl("adam_step_", &Steps::adam_step);
  m.impl("masked_delta_", &masked_delta_cpu);
  m.impl("agem_dot_", &agem_dot_cpu);
}

TORCH_LIBRARY_IMPL(cnl_ext, Meta, m) {
  for (const char* op : {"sgd_step_", "adam_step_", "masked_delta_", "agem_dot_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&cnl::binding::meta_kernel>());
  }
}

// The module name: cnl_ext._cpu_<isa> when setup.py builds it, the JIT name when
// torch.utils.cpp_extension.load does (both define TORCH_EXTENSION_NAME).
#ifndef TORCH_EXTENSION_NAME
#error "TORCH_EXTENSION_NAME must name the module (setup.py and cpp_extension.load define it)"
#endif
#define CNL_CONCAT_(a, b) a##b
#define CNL_CONCAT(a, b) CNL_CONCAT_(a, b)
#define CNL_STRINGIFY_(x) #x
#define CNL_STRINGIFY(x) CNL_STRINGIFY_(x)

PyMODINIT_FUNC CNL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, CNL_STRINGIFY(TORCH_EXTENSION_NAME),
                               "cnl_ext CPU kernels of torch.ops.cnl_ext.sgd_step_, adam_step_, masked_delta_ "
                               "and the KIF fusion ops.",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "cpu_capability", cnl::cpu::capability()) < 0 ||
      PyModule_AddIntConstant(m, "item_size", static_cast<long>(cnl::cpu::kItemSize)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
