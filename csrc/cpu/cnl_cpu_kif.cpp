// KIF's and Recurrent-KIF's fusion passes on the CPU: the ops torch.ops.cnl_ext.kif_task_vector_fuse_
// and kif_recurrent_fuse_ (CPU and Meta kernels; the schemas are in cnl_binding.h). One pass per
// element, vectorized with ATen's Vectorized<float> (float32 Recurrent-KIF: a plain loop the compiler
// vectorizes), parallel over the work items of all tensors of the call.
//
// Math and rounding of cnl_ext/ops/kif_fusion_torch.py (the oracle): float32 operations in its
// order, each rounded on its own (-ffp-contract=off, no fmadd), the new parameter rounded once to
// its dtype (nearest even) on store. cnl_ext.kif validates and buckets the tensors; the bindings
// re-check what a wrong pointer would turn into memory corruption.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>

#include "cnl_binding.h"
#include "cnl_cpu_vec.h"

namespace cnl::cpu {
namespace {

using at::Tensor;
using at::TensorList;

static_assert(kItemSize % kBlock == 0, "items start on block boundaries");

// ---------------------------------------------------------------------------- KIF

// θ <- a + c·(θ − a), with the torch backend's roundings: ((θ − a)·c) + a. Element f of the tensor
// takes coefficients[(f / div) % mod] (`coefficients` already offset to the tensor's first unit).
// Streams: param (T), anchor (A). One object per work item, whose blocks come in increasing order:
// it keeps the run of elements of one unit that the last block lay in (no division per block).
template <typename T, typename A>
struct TaskVectorBlock {
  const float* coefficients;
  int64_t div, mod;
  int64_t run_end = 0;  // the end of the run of `coefficient`'s unit that the last block began in
  float coefficient = 0.0f;

  C10_ALWAYS_INLINE void operator()(void* const (&ptrs)[2], int64_t offset, int64_t element, int64_t) {
    T* param = static_cast<T*>(ptrs[0]) + offset;
    const A* anchor = static_cast<const A*>(ptrs[1]) + offset;
    Vec c[kVecs];
    if (element >= run_end) {
      const int64_t run = element / div;
      run_end = (run + 1) * div;
      coefficient = coefficients[run % mod];
    }
    if (element + kBlock <= run_end) {  // the block lies in one run
      for (int64_t j = 0; j < kVecs; ++j) c[j] = Vec(coefficient);
    } else {
      alignas(64) float per_element[kBlock];
      for (int64_t k = 0; k < kBlock; ++k) per_element[k] = coefficients[(element + k) / div % mod];
      for (int64_t j = 0; j < kVecs; ++j) c[j] = Vec::loadu(per_element + j * kW);
    }
    for (int64_t j = 0; j < kVecs; j += 2) {
      Vec p0, p1, a0, a1;
      load_pair(param + j * kW, p0, p1);
      load_pair(anchor + j * kW, a0, a1);
      store_pair(param + j * kW, (p0 - a0) * c[j] + a0, (p1 - a1) * c[j + 1] + a1);
    }
  }
};

// ---------------------------------------------------------------------------- Recurrent-KIF

// θ <- θ_b + w_in·(θ_Q − θ_b) + w_out·(θ − θ_Q), with the torch backend's roundings:
// ((θ − θ_Q)·w_out) + (((θ_Q − θ_b)·w_in) + θ_b); then θ_b <- θ as stored with update_anchors.
// Streams: param (T), anchor θ_b (A), inner end θ_Q (A), S_in, U_in, S_out, U_out (float32). The
// pass of 16-bit params or anchors; float32 ones take recurrent_float (below).
template <typename T, typename A>
struct RecurrentBlock {
  float delta_in, delta_out;
  bool paper_rule, update_anchors;

  // (w_in, w_out) of the masks (all-ones lanes where S·U > δ, strictly; a NaN score does not fire).
  C10_ALWAYS_INLINE void weights(const Vec& m_in, const Vec& m_out, Vec& w_in, Vec& w_out) const {
    const Vec zero(0.0f), half(0.5f), one(1.0f);
    if (paper_rule) {  // the binary masks of Eq 9
      w_in = Vec::blendv(zero, one, m_in);
      w_out = Vec::blendv(zero, one, m_out);
    } else {  // the authors' code: (0.4, 0.6) both, (1, 0) inner only, (0, 1) outer only, (0.5, 0.5) neither
      w_in = Vec::blendv(Vec::blendv(half, zero, m_out), Vec::blendv(one, Vec(0.4f), m_out), m_in);
      w_out = Vec::blendv(Vec::blendv(half, one, m_out), Vec::blendv(zero, Vec(0.6f), m_out), m_in);
    }
  }

  C10_ALWAYS_INLINE Vec fuse(const Vec& theta, const Vec& theta_b, const Vec& theta_q, const Vec& s_in,
                             const Vec& u_in, const Vec& s_out, const Vec& u_out) const {
    Vec w_in, w_out;
    weights(s_in * u_in > Vec(delta_in), s_out * u_out > Vec(delta_out), w_in, w_out);
    const Vec inner = (theta_q - theta_b) * w_in + theta_b;
    return (theta - theta_q) * w_out + inner;
  }

  C10_ALWAYS_INLINE void operator()(void* const (&ptrs)[7], int64_t offset, int64_t, int64_t) const {
    T* param = static_cast<T*>(ptrs[0]) + offset;
    A* anchor = static_cast<A*>(ptrs[1]) + offset;
    const A* end = static_cast<const A*>(ptrs[2]) + offset;
    const float* scores[4];
    for (int k = 0; k < 4; ++k) scores[k] = static_cast<const float*>(ptrs[3 + k]) + offset;
    for (int64_t j = 0; j < kVecs; j += 2) {
      Vec p[2], b[2], q[2];
      load_pair(param + j * kW, p[0], p[1]);
      load_pair(anchor + j * kW, b[0], b[1]);
      load_pair(end + j * kW, q[0], q[1]);
      for (int h = 0; h < 2; ++h) {
        const int64_t at = (j + h) * kW;
        p[h] = fuse(p[h], b[h], q[h], Vec::loadu(scores[0] + at), Vec::loadu(scores[1] + at),
                    Vec::loadu(scores[2] + at), Vec::loadu(scores[3] + at));
      }
      store_pair(param + j * kW, p[0], p[1]);
      if (update_anchors) {
        if constexpr (!std::is_same_v<T, A>) load_pair(param + j * kW, p[0], p[1]);  // the value as stored
        store_pair(anchor + j * kW, p[0], p[1]);
      }
    }
  }
};

// The same pass for float32 params and anchors as a plain loop, which the compiler vectorizes: 6-7%
// faster than RecurrentBlock on one core of the project's AVX-512 machine (bench/importance_fusion.py
// --threads 1), where a core's bandwidth is the limit. The same operations in the same order
// (-ffp-contract=off), so the same bits.
void recurrent_float(float* __restrict__ p, float* __restrict__ b, const float* __restrict__ q,
                     const float* __restrict__ si, const float* __restrict__ ui, const float* __restrict__ so,
                     const float* __restrict__ uo, int64_t n, float delta_in, float delta_out, bool paper_rule,
                     bool update_anchors) {
  for (int64_t i = 0; i < n; ++i) {
    const bool in = si[i] * ui[i] > delta_in, out = so[i] * uo[i] > delta_out;
    float w_in, w_out;
    if (paper_rule) {
      w_in = in ? 1.0f : 0.0f;
      w_out = out ? 1.0f : 0.0f;
    } else {
      w_in = in ? (out ? 0.4f : 1.0f) : (out ? 0.0f : 0.5f);
      w_out = in ? (out ? 0.6f : 0.0f) : (out ? 1.0f : 0.5f);
    }
    const float r = (p[i] - q[i]) * w_out + ((q[i] - b[i]) * w_in + b[i]);
    p[i] = r;
    if (update_anchors) b[i] = r;
  }
}

// ---------------------------------------------------------------------------- dispatch and checks

// f(T{}, A{}) for the parameter and anchor dtypes (both checked by binding::fusion_dtype).
template <class F>
void dispatch(at::ScalarType param, at::ScalarType anchor, const F& f) {
  const auto with_anchor = [&](auto param_tag) {
    switch (anchor) {
      case at::kFloat: return f(param_tag, float{});
      case at::kBFloat16: return f(param_tag, c10::BFloat16{});
      default: return f(param_tag, c10::Half{});
    }
  };
  switch (param) {
    case at::kFloat: return with_anchor(float{});
    case at::kBFloat16: return with_anchor(c10::BFloat16{});
    default: return with_anchor(c10::Half{});
  }
}

constexpr const char* kOtherBackends = "other devices: backend 'triton' or 'torch', or cnl_ext._C on CUDA";

void task_vector_fuse_cpu(TensorList params, TensorList anchors, const Tensor& coefficients,
                          at::IntArrayRef unit_offsets, at::IntArrayRef unit_divs, at::IntArrayRef unit_mods) {
  constexpr const char* op = "cnl_ext.kif_task_vector_fuse_";
  const std::vector<int64_t> numels = binding::fusion_params(params, op, c10::DeviceType::CPU, kOtherBackends);
  const std::vector<void*> anchor_ptrs = binding::fusion_list(anchors, op, "anchors", params);
  binding::check_units(coefficients, numels, unit_offsets, unit_divs, unit_mods, op, params[0]);
  const float* c = coefficients.data_ptr<float>();
  const std::vector<WorkItem> items = work_items(static_cast<int64_t>(params.size()), numels.data());
  dispatch(params[0].scalar_type(), anchors[0].scalar_type(), [&](auto param_tag, auto anchor_tag) {
    using T = decltype(param_tag);
    using A = decltype(anchor_tag);
    const int bits[2] = {8 * sizeof(T), 8 * sizeof(A)};
    const bool written[2] = {true, false};
    run_items(items, [&](int64_t k) {
      const int64_t t = items[k].tensor;
      TaskVectorBlock<T, A> block{c + unit_offsets[t], unit_divs[t], unit_mods[t]};
      void* const ptrs[2] = {params[t].data_ptr(), anchor_ptrs[t]};
      run_blocks(block, ptrs, bits, written, items[k].start, items[k].end);
    });
  });
}

void recurrent_fuse_cpu(TensorList params, TensorList anchors, TensorList inner_ends, TensorList inner_sensitivities,
                        TensorList inner_uncertainties, TensorList outer_sensitivities,
                        TensorList outer_uncertainties, double delta_in, double delta_out, c10::string_view rule,
                        bool update_anchors) {
  constexpr const char* op = "cnl_ext.kif_recurrent_fuse_";
  binding::check_recurrent_options(rule, delta_in, delta_out, op);
  const std::vector<int64_t> numels = binding::fusion_params(params, op, c10::DeviceType::CPU, kOtherBackends);
  const std::vector<void*> anchor_ptrs = binding::fusion_list(anchors, op, "anchors", params);
  const at::ScalarType anchor_dtype = anchors[0].scalar_type();
  const std::vector<void*> columns[5] = {
      binding::fusion_list(inner_ends, op, "inner_ends", params, anchor_dtype),
      binding::fusion_list(inner_sensitivities, op, "inner_sensitivities", params, at::kFloat),
      binding::fusion_list(inner_uncertainties, op, "inner_uncertainties", params, at::kFloat),
      binding::fusion_list(outer_sensitivities, op, "outer_sensitivities", params, at::kFloat),
      binding::fusion_list(outer_uncertainties, op, "outer_uncertainties", params, at::kFloat)};
  const std::vector<WorkItem> items = work_items(static_cast<int64_t>(params.size()), numels.data());
  dispatch(params[0].scalar_type(), anchor_dtype, [&](auto param_tag, auto anchor_tag) {
    using T = decltype(param_tag);
    using A = decltype(anchor_tag);
    // the thresholds rounded to float32, as the torch backend's threshold tensors
    const RecurrentBlock<T, A> block{static_cast<float>(delta_in), static_cast<float>(delta_out), rule == "paper",
                                     update_anchors};
    const int bits[7] = {8 * sizeof(T), 8 * sizeof(A), 8 * sizeof(A), 32, 32, 32, 32};
    const bool written[7] = {true, update_anchors, false, false, false, false, false};
    run_items(items, [&](int64_t k) {
      const int64_t t = items[k].tensor;
      void* const ptrs[7] = {params[t].data_ptr(), anchor_ptrs[t], columns[0][t], columns[1][t],
                             columns[2][t],        columns[3][t],  columns[4][t]};
      if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
        const int64_t at = items[k].start;
        const auto column = [&](int c) { return static_cast<float*>(ptrs[c]) + at; };
        recurrent_float(column(0), column(1), column(2), column(3), column(4), column(5), column(6),
                        items[k].end - at, block.delta_in, block.delta_out, block.paper_rule, block.update_anchors);
      } else {
        run_blocks(block, ptrs, bits, written, items[k].start, items[k].end);
      }
    });
  });
}

}  // namespace
}  // namespace cnl::cpu

// The schemas (cnl_binding.h) are defined here, with the CPU library; cnl_ext._C adds CUDA kernels.
TORCH_LIBRARY_FRAGMENT(cnl_ext, m) {
  m.def(cnl::binding::kTaskVectorFuseSchema);
  m.def(cnl::binding::kRecurrentFuseSchema);
}

TORCH_LIBRARY_IMPL(cnl_ext, CPU, m) {
  m.impl("kif_task_vector_fuse_", &cnl::cpu::task_vector_fuse_cpu);
  m.impl("kif_recurrent_fuse_", &cnl::cpu::recurrent_fuse_cpu);
}

TORCH_LIBRARY_IMPL(cnl_ext, Meta, m) {
  for (const char* op : {"kif_task_vector_fuse_", "kif_recurrent_fuse_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&cnl::binding::meta_kernel>());
  }
}
