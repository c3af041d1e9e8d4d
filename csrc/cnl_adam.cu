// CNL Adam / AdamW step (torch.optim.Adam / AdamW semantics, then the CNL mask), multi-tensor.
// Math: the definition, cnl_adam_step in cnl_ext/optim/adam.py; layout: cnl_multi_tensor.cuh.
#include "cnl_multi_tensor.cuh"

namespace cnl {
namespace {

// table columns: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, reference, step (capturable), EWC's F
// and anchor (read by the kernels without importance only: see kRules), then with importance:
// sensitivity, uncertainty (launch_step appends those two)
template <bool kImportance>
constexpr int kAdamDepth = kImportance ? 11 : 9;
static_assert(kFitsKernelArguments<kAdamDepth<true>, AdamScalarsT<double>, ImportanceScalars, double*> &&
                  kFitsKernelArguments<kAdamDepth<false>, AdamScalarsT<double>, ImportanceScalars, double*>,
              "tensor table too large for the kernel argument space");

template <typename T>
struct AdamPtrs {
  T* __restrict__ param;
  const T* __restrict__ grad;
  Compute<T>* __restrict__ exp_avg;
  Compute<T>* __restrict__ exp_avg_sq;
  Compute<T>* __restrict__ max_exp_avg_sq;  // nullptr without amsgrad
  const void* __restrict__ ref;
  float* __restrict__ sensitivity;  // nullptr without importance
  float* __restrict__ uncertainty;
  ImportanceScalars importance;
  const float* __restrict__ fisher = nullptr;  // issue 22: EWC's F and anchor (nullptr without EWC)
  const T* __restrict__ anchor = nullptr;
};

template <typename T, RefFormat kRef, bool kStats, bool kImportance>
struct AdamStep {
  using C = Compute<T>;

  template <int N>
  static __device__ __forceinline__ void run(const AdamPtrs<T>& a, int64_t i, const AdamScalarsT<C>& s, StatAcc& acc) {
    C p[N], g[N], m[N], v[N], vmax[N] = {}, r[N];
    ImportanceBlock<kImportance, N> importance;
    load<N>(p, a.param, i);
    load<N>(g, a.grad, i);
    if constexpr (kRules<kImportance>) {
      // maximize's sign and issue 22's terms, in place, before the moments are loaded: F and the
      // anchor take no registers during the step.
      load_reference<N, kRef>(r, a.ref, i);
      rule_gradient<N, T>(g, p, r, s, a.fisher, a.anchor, i);
    }
    load<N>(m, a.exp_avg, i);
    load<N>(v, a.exp_avg_sq, i);
    if (s.amsgrad) load<N>(vmax, a.max_exp_avg_sq, i);
    if constexpr (!kRules<kImportance>) load_reference<N, kRef>(r, a.ref, i);
    importance.load_from(a.sensitivity, a.uncertainty, i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      C gk = kRules<kImportance> ? g[k] : (s.maximize ? -g[k] : g[k]);  // the EMAs read g as passed
      if (s.l2_weight_decay) gk = add(gk, mul(s.weight_decay, p[k]));
      // Moments are updated for every element; the mask touches only the parameter.
      m[k] = add(mul(s.beta1, m[k]), mul(s.one_minus_beta1, gk));
      v[k] = add(mul(s.beta2, v[k]), mul(s.one_minus_beta2, mul(gk, gk)));
      C second = v[k];
      if (s.amsgrad) second = vmax[k] = nan_max(vmax[k], v[k]);
      // torch.optim's order: step = (step_size·m) / denom, one division per element.
      const C denom = add(div(sqrt_rn(second), s.bias_correction2_sqrt), s.eps);
      const C step = div(mul(s.step_size, m[k]), denom);
      // The mask and the statistics see lr·u (the sums are scaled by 1/lr once per block).
      C lr_u, p_new;
      if (s.decoupled_weight_decay) {
        // AdamW: the decay is part of u (spec), so a frozen element is not decayed either.
        lr_u = add(step, mul(s.lr_weight_decay, p[k]));
        p_new = sub(mul(p[k], s.one_minus_lr_wd), step);  // torch.optim.AdamW's order
      } else {
        lr_u = step;
        p_new = sub(p[k], step);
      }
      // A-GEM (the rule kernels only): the references projected, they mask nothing.
      p[k] = (kRules<kImportance> && s.project) ? p_new : cnl_select<kRef, kStats>(p[k], p_new, lr_u, r[k], acc);
    }
    store<N>(a.param, i, p);  // unchanged elements round-trip exactly (see cnl_sgd.cu)
    store<N>(a.exp_avg, i, m);
    store<N>(a.exp_avg_sq, i, v);
    if (s.amsgrad) store<N>(a.max_exp_avg_sq, i, vmax);
    importance.template update_and_store<T>(a.importance, p, g, a.sensitivity, a.uncertainty, i);
  }
};

template <typename T, RefFormat kRef, bool kStats, bool kImportance>
__global__ void __launch_bounds__(kBlockThreads)
    adam_kernel(const __grid_constant__ TensorTable<kAdamDepth<kImportance>> table, AdamScalarsT<Compute<T>> s,
                ImportanceScalars importance, double* __restrict__ partials) {
  using C = Compute<T>;
  const int t = find_tensor(table, blockIdx.x);
  // Capturable: hyper-parameters that change every step are read on the device (uniform per block),
  // and the scalars derived from them computed in the compute type (the definition,
  // cnl_ext/optim/adam.py, as the CPU kernels and the torch backend).
  if (s.lr_ptr != nullptr) {
    s.lr = static_cast<C>(*s.lr_ptr);
    s.lr_weight_decay = mul(s.lr, s.weight_decay);
    s.one_minus_lr_wd = sub(C(1), s.lr_weight_decay);
  }
  if (table.ptr[6][t] != nullptr) {
    const C step = static_cast<C>(*static_cast<const float*>(table.ptr[6][t]));
    s.bias_correction1 = sub(C(1), pow(s.beta1, step));
    s.bias_correction2_sqrt = sqrt_rn(sub(C(1), pow(s.beta2, step)));
  }
  if (s.lr_ptr != nullptr || table.ptr[6][t] != nullptr) s.step_size = div(s.lr, s.bias_correction1);
  const int64_t start = static_cast<int64_t>(blockIdx.x - table.block_start[t]) * kChunkSize;
  const int64_t end = min(start + kChunkSize, table.numel[t]);
  AdamPtrs<T> a{static_cast<T*>(table.ptr[0][t]),     static_cast<const T*>(table.ptr[1][t]),
                static_cast<C*>(table.ptr[2][t]),     static_cast<C*>(table.ptr[3][t]),
                static_cast<C*>(table.ptr[4][t]),     table.ptr[5][t],
                nullptr,                              nullptr,
                importance};
  if constexpr (kRules<kImportance>) {
    a.fisher = static_cast<const float*>(table.ptr[7][t]);
    a.anchor = static_cast<const T*>(table.ptr[8][t]);
  }
  if constexpr (kImportance) {
    a.sensitivity = static_cast<float*>(table.ptr[9][t]);
    a.uncertainty = static_cast<float*>(table.ptr[10][t]);
  }
  const bool vectorizable = aligned_to(a.param, 4 * sizeof(T)) && aligned_to(a.grad, 4 * sizeof(T)) &&
                            aligned_to(a.exp_avg, 4 * sizeof(C)) && aligned_to(a.exp_avg_sq, 4 * sizeof(C)) &&
                            aligned_to(a.max_exp_avg_sq, 4 * sizeof(C)) && aligned_to(a.ref, reference_alignment<kRef>()) &&
                            aligned_to(a.sensitivity, 16) && aligned_to(a.uncertainty, 16) &&
                            aligned_to(a.fisher, 16) && aligned_to(a.anchor, 4 * sizeof(T));
  StatAcc acc;
  chunk_loop<AdamStep<T, kRef, kStats, kImportance>>(a, vectorizable, start, end, s, acc);
  if constexpr (kStats) {
    // The statistics of lr·u, scaled by 1/lr (0 at lr = 0, where nothing moves).
    const double inv_lr = s.lr == C(0) ? 0.0 : 1.0 / static_cast<double>(s.lr);
    acc.collaborative *= inv_lr;
    acc.conflicting *= inv_lr;
    write_partials(acc, partials + 3 * (table.partial_base + blockIdx.x));
  }
}

}  // namespace

// launch_step's kernel launch (cnl_multi_tensor.cuh)
struct AdamLaunch {
  template <class Tag, int kDepth, typename C>
  static void launch(const TensorTable<kDepth>& table, unsigned blocks, cudaStream_t stream,
                     const AdamScalarsT<C>& scalars, const ImportanceScalars& importance, double* partials) {
    adam_kernel<typename Tag::param_t, Tag::ref, Tag::stats, Tag::importance>
        <<<blocks, kBlockThreads, 0, stream>>>(table, scalars, importance, partials);
  }
};

template <typename C>
cudaError_t launch_adam_step(const TensorLists& lists, const AdamScalarsT<C>& scalars, const Importance* importance,
                             cudaStream_t stream) {
  const bool has_ref = lists.ref_format != RefFormat::kNone;
  if (lists.states[0] == nullptr || lists.states[1] == nullptr) return cudaErrorInvalidValue;
  if (scalars.amsgrad && lists.states[2] == nullptr) return cudaErrorInvalidValue;
  if (has_ref && lists.references == nullptr) return cudaErrorInvalidValue;
  if (scalars.ewc && (lists.fishers == nullptr || lists.anchors == nullptr)) return cudaErrorInvalidValue;
  if ((scalars.ewc || scalars.project) && importance != nullptr) return cudaErrorInvalidValue;  // see kRules
  void* const* const columns[kAdamDepth<false>] = {lists.params,
                                                   lists.grads,
                                                   lists.states[0],
                                                   lists.states[1],
                                                   scalars.amsgrad ? lists.states[2] : nullptr,
                                                   has_ref ? lists.references : nullptr,
                                                   lists.steps,
                                                   scalars.ewc ? lists.fishers : nullptr,
                                                   scalars.ewc ? lists.anchors : nullptr};
  return launch_step<AdamLaunch, C>(lists, columns, scalars, importance, stream);
}

template cudaError_t launch_adam_step<float>(const TensorLists&, const AdamScalarsT<float>&, const Importance*,
                                             cudaStream_t);
template cudaError_t launch_adam_step<double>(const TensorLists&, const AdamScalarsT<double>&, const Importance*,
                                              cudaStream_t);

}  // namespace cnl
