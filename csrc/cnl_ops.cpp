// PyTorch bindings of the CUDA kernels: torch.ops.cnl_ext.sgd_step_ and adam_step_ (KIF's EMAs
// updated in the same pass where given), and KIF's fusion passes kif_task_vector_fuse_ and
// kif_recurrent_fuse_.
//
// The schemas, the CPU and the Meta kernels are registered by the CPU library (csrc/cpu/, one
// variant per instruction set), which cnl_ext.ops.native_backend loads before this one: a process
// defines the ops exactly once. Input validation is shared with it (cnl_binding.h).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cnl_binding.h"
#include "cnl_common.h"

namespace {

using at::Tensor;
using at::TensorList;
using cnl::binding::Collected;

constexpr const char* kOtherBackends = "CPU tensors run the CPU kernels of the same ops";

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The statistics workspace: one partial row per block (cnl_common.h).
void allocate_partials(Collected& c, const Tensor& param) {
  if (c.lists.stats == nullptr) return;
  const int64_t chunks = cnl::num_chunks(c.numels.data(), c.lists.count);
  c.partials = at::empty({std::max<int64_t>(3 * chunks, 1)}, param.options().dtype(at::kDouble));
  c.lists.partials = c.partials.data_ptr<double>();
}

// Issue 22's terms (validated into c.lists by cnl_binding.h's collect_rules) as the CUDA kernels take
// them: in the step's scalars, 2*lambda and c rounded once to the compute type. The kernels with KIF's
// importance EMAs do not apply them (cnl_multi_tensor.cuh's kRules): cnl_ext.ops.native_backend never
// passes both, it updates the EMAs after a step with the terms (cnl_ext/ops/importance.py).
template <class Scalars>
Scalars with_rules(const Scalars& s, const Collected& c, const cnl::Importance* importance, const char* op) {
  using C = decltype(s.lr);
  TORCH_CHECK(importance == nullptr || (c.lists.fishers == nullptr && !c.lists.project), op,
              ": the CUDA kernels do not apply EWC's or A-GEM's terms (ewc_fishers, agem_coefficient) in a "
              "pass that updates the importance EMAs (sensitivities); cnl_ext.ops.native_backend updates the "
              "EMAs after the step there");
  Scalars out = s;
  out.ewc = c.lists.fishers != nullptr;
  out.ewc_two_lambda = static_cast<C>(c.lists.ewc_two_lambda);
  out.project = c.lists.project;
  out.agem_coefficient = static_cast<C>(c.lists.agem_coefficient);
  return out;
}

// The CUDA kernels of the step ops (cnl_binding.h's StepOps validates their inputs): enqueued on the
// current stream of the params' device. C: the compute type (double for float64 parameters).
struct CudaSteps {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr const char* kOtherBackends = ::kOtherBackends;
  template <typename C>
  static void sgd(Collected& c, const cnl::SgdScalarsT<C>& s, const cnl::Importance* importance, const char* op,
                  const Tensor& param) {
    allocate_partials(c, param);
    const c10::cuda::CUDAGuard guard(param.device());
    check_launch(cnl::launch_sgd_step(c.lists, with_rules(s, c, importance, op), importance,
                                      c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  }
  template <typename C>
  static void adam(Collected& c, const cnl::AdamScalarsT<C>& s, const cnl::Importance* importance, const char* op,
                   const Tensor& param) {
    allocate_partials(c, param);
    const c10::cuda::CUDAGuard guard(param.device());
    check_launch(cnl::launch_adam_step(c.lists, with_rules(s, c, importance, op), importance,
                                       c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  }
};
using Steps = cnl::binding::StepOps<CudaSteps>;

// Checks the params of a KIF op (cnl::binding::fusion_params) and fills what its launch reads of
// c.lists: count, numels, param pointers and type.
void collect_fusion_params(Collected& c, TensorList params, const char* op) {
  c.numels = cnl::binding::fusion_params(params, op, c10::DeviceType::CUDA, kOtherBackends);
  c.params.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) c.params[i] = params[i].data_ptr();
  c.lists.count = static_cast<int64_t>(params.size());
  c.lists.numels = c.numels.data();
  c.lists.params = c.params.data();
  c.lists.param_type = cnl::binding::param_type(params[0].scalar_type(), op);
}

void task_vector_fuse_cuda(TensorList params, TensorList anchors, const Tensor& coefficients,
                           at::IntArrayRef unit_offsets, at::IntArrayRef unit_divs, at::IntArrayRef unit_mods) {
  constexpr const char* op = "cnl_ext.kif_task_vector_fuse_";
  Collected c;
  collect_fusion_params(c, params, op);
  const std::vector<void*> anchor_ptrs = cnl::binding::fusion_list(anchors, op, "anchors", params);
  cnl::binding::check_units(coefficients, c.numels, unit_offsets, unit_divs, unit_mods, op, params[0]);
  std::vector<int64_t> rows(3 * params.size());  // (offset, div, mod) per tensor, read by the kernels
  for (size_t i = 0; i < params.size(); ++i) {
    rows[3 * i] = unit_offsets[i];
    rows[3 * i + 1] = unit_divs[i];
    rows[3 * i + 2] = unit_mods[i];
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  // stream-ordered on the current stream, as the kernels: the allocator reuses it only after them
  const Tensor units = at::tensor(rows, at::kLong).to(params[0].device());
  check_launch(cnl::launch_task_vector_fuse(c.lists, cnl::binding::param_type(anchors[0].scalar_type(), op),
                                            anchor_ptrs.data(), coefficients.const_data_ptr<float>(),
                                            units.const_data_ptr<int64_t>(),
                                            c10::cuda::getCurrentCUDAStream().stream()),
               op);
}

void recurrent_fuse_cuda(TensorList params, TensorList anchors, TensorList inner_ends,
                         TensorList inner_sensitivities, TensorList inner_uncertainties,
                         TensorList outer_sensitivities, TensorList outer_uncertainties, double delta_in,
                         double delta_out, c10::string_view rule, bool update_anchors) {
  constexpr const char* op = "cnl_ext.kif_recurrent_fuse_";
  cnl::binding::check_recurrent_options(rule, delta_in, delta_out, op);
  Collected c;
  collect_fusion_params(c, params, op);
  const std::vector<void*> anchor_ptrs = cnl::binding::fusion_list(anchors, op, "anchors", params);
  const at::ScalarType anchor_dtype = anchors[0].scalar_type();
  const std::vector<void*> lists[cnl::kRecurrentColumns] = {
      anchor_ptrs,
      cnl::binding::fusion_list(inner_ends, op, "inner_ends", params, anchor_dtype),
      cnl::binding::fusion_list(inner_sensitivities, op, "inner_sensitivities", params, at::kFloat),
      cnl::binding::fusion_list(inner_uncertainties, op, "inner_uncertainties", params, at::kFloat),
      cnl::binding::fusion_list(outer_sensitivities, op, "outer_sensitivities", params, at::kFloat),
      cnl::binding::fusion_list(outer_uncertainties, op, "outer_uncertainties", params, at::kFloat)};
  void* const* columns[cnl::kRecurrentColumns];
  for (int k = 0; k < cnl::kRecurrentColumns; ++k) columns[k] = lists[k].data();
  // the thresholds rounded to float32, as the torch backend's threshold tensors
  const cnl::RecurrentScalars s{static_cast<float>(delta_in), static_cast<float>(delta_out), rule == "paper",
                                update_anchors};
  const c10::cuda::CUDAGuard guard(params[0].device());
  check_launch(cnl::launch_recurrent_fuse(c.lists, cnl::binding::param_type(anchor_dtype, op), columns, s,
                                          c10::cuda::getCurrentCUDAStream().stream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnl_ext, CUDA, m) {
  m.impl("sgd_step_", &Steps::sgd_step);
  m.impl("adam_step_", &Steps::adam_step);
  m.impl("kif_task_vector_fuse_", &task_vector_fuse_cuda);
  m.impl("kif_recurrent_fuse_", &recurrent_fuse_cuda);
}

// `import cnl_ext._C` loads this library, which runs the registrations above. The module itself
// only carries build information for cnl_ext.ops.native_backend.build_info().
// setup.py passes the architectures as a bare token (8.0;9.0+PTX -> 80_90PTX), stringified here.
#ifndef CNL_EXT_CUDA_ARCHS
#define CNL_EXT_CUDA_ARCHS unknown
#endif
#define CNL_EXT_STRINGIFY_(x) #x
#define CNL_EXT_STRINGIFY(x) CNL_EXT_STRINGIFY_(x)

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "cnl_ext CUDA kernels of torch.ops.cnl_ext: the CNL steps and KIF's fusion passes.",
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
