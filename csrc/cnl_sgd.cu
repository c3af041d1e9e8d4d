// CNL SGD / momentum SGD step (torch.optim.SGD semantics, then the CNL mask), multi-tensor.
// Math: cnl_ext/ops/torch_backend.py sgd_step_; layout: cnl_multi_tensor.cuh.
#include "cnl_multi_tensor.cuh"

namespace cnl {
namespace {

// table columns: param, grad, momentum buffer, reference, EWC's F and anchor (read by the kernels without
// importance only: see kRules), then with importance: sensitivity, uncertainty (launch_step appends those two)
template <bool kImportance>
constexpr int kSgdDepth = kImportance ? 8 : 6;
static_assert(kFitsKernelArguments<kSgdDepth<true>, SgdScalarsT<double>, ImportanceScalars, double*> &&
                  kFitsKernelArguments<kSgdDepth<false>, SgdScalarsT<double>, ImportanceScalars, double*>,
              "tensor table too large for the kernel argument space");

template <typename T>
struct SgdPtrs {
  T* __restrict__ param;
  const T* __restrict__ grad;
  Compute<T>* __restrict__ buf;  // nullptr without momentum
  const void* __restrict__ ref;
  float* __restrict__ sensitivity;  // nullptr without importance
  float* __restrict__ uncertainty;
  ImportanceScalars importance;
  const float* __restrict__ fisher = nullptr;  // issue 22: EWC's F and anchor (nullptr without EWC)
  const T* __restrict__ anchor = nullptr;
};

template <typename T, RefFormat kRef, bool kStats, bool kImportance>
struct SgdStep {
  using C = Compute<T>;

  template <int N>
  static __device__ __forceinline__ void run(const SgdPtrs<T>& a, int64_t i, const SgdScalarsT<C>& s, StatAcc& acc) {
    C p[N], g[N], b[N] = {}, r[N];
    ImportanceBlock<kImportance, N> importance;
    load<N>(p, a.param, i);
    load<N>(g, a.grad, i);
    load_reference<N, kRef>(r, a.ref, i);
    if constexpr (kRules<kImportance>) {
      rule_gradient<N, T>(g, p, r, s, a.fisher, a.anchor, i);  // maximize's sign and issue 22's terms, in place
    }
    if (s.has_momentum && !s.first_step) load<N>(b, a.buf, i);
    importance.load_from(a.sensitivity, a.uncertainty, i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      C gk = kRules<kImportance> ? g[k] : (s.maximize ? -g[k] : g[k]);  // the EMAs read g as passed
      if (s.has_weight_decay) gk = add(gk, mul(s.weight_decay, p[k]));
      C u = gk;
      if (s.has_momentum) {
        // torch.optim.SGD starts the buffer at the first gradient, undamped.
        b[k] = s.first_step ? gk : add(mul(s.momentum, b[k]), mul(s.one_minus_dampening, gk));
        u = s.nesterov ? add(gk, mul(s.momentum, b[k])) : b[k];
      }
      const C p_new = sub(p[k], mul(s.lr, u));  // s.lr: see sgd_kernel
      // A-GEM (the rule kernels only): the references projected, they mask nothing.
      p[k] = (kRules<kImportance> && s.project) ? p_new : cnl_select<kRef, kStats>(p[k], p_new, u, r[k], acc);
    }
    // Unchanged elements are written back too: a round trip through C is exact for every dtype,
    // and uniform full-vector stores beat per-element predication on a memory-bound kernel.
    store<N>(a.param, i, p);
    if (s.has_momentum) store<N>(a.buf, i, b);
    importance.template update_and_store<T>(a.importance, p, g, a.sensitivity, a.uncertainty, i);
  }
};

template <typename T, RefFormat kRef, bool kStats, bool kImportance>
__global__ void __launch_bounds__(kBlockThreads)
    sgd_kernel(const __grid_constant__ TensorTable<kSgdDepth<kImportance>> table, SgdScalarsT<Compute<T>> s,
               ImportanceScalars importance, double* __restrict__ partials) {
  using C = Compute<T>;
  if (s.lr_ptr != nullptr) s.lr = static_cast<C>(*s.lr_ptr);  // capturable: the learning rate lives on the device
  const int t = find_tensor(table, blockIdx.x);
  const int64_t start = static_cast<int64_t>(blockIdx.x - table.block_start[t]) * kChunkSize;
  const int64_t end = min(start + kChunkSize, table.numel[t]);
  SgdPtrs<T> a{static_cast<T*>(table.ptr[0][t]), static_cast<const T*>(table.ptr[1][t]),
               static_cast<C*>(table.ptr[2][t]), table.ptr[3][t], nullptr, nullptr, importance};
  if constexpr (kRules<kImportance>) {
    a.fisher = static_cast<const float*>(table.ptr[4][t]);
    a.anchor = static_cast<const T*>(table.ptr[5][t]);
  }
  if constexpr (kImportance) {
    a.sensitivity = static_cast<float*>(table.ptr[6][t]);
    a.uncertainty = static_cast<float*>(table.ptr[7][t]);
  }
  // Vector accesses need every stream of this tensor aligned to its vector size (chunk starts are
  // multiples of kVec, so the tensor's base pointers decide). nullptr columns pass.
  const bool vectorizable = aligned_to(a.param, 4 * sizeof(T)) && aligned_to(a.grad, 4 * sizeof(T)) &&
                            aligned_to(a.buf, 4 * sizeof(C)) && aligned_to(a.ref, reference_alignment<kRef>()) &&
                            aligned_to(a.sensitivity, 16) && aligned_to(a.uncertainty, 16) &&
                            aligned_to(a.fisher, 16) && aligned_to(a.anchor, 4 * sizeof(T));
  StatAcc acc;
  chunk_loop<SgdStep<T, kRef, kStats, kImportance>>(a, vectorizable, start, end, s, acc);
  if constexpr (kStats) write_partials(acc, partials + 3 * (table.partial_base + blockIdx.x));
}

}  // namespace

// launch_step's kernel launch (cnl_multi_tensor.cuh)
struct SgdLaunch {
  template <class Tag, int kDepth, typename C>
  static void launch(const TensorTable<kDepth>& table, unsigned blocks, cudaStream_t stream,
                     const SgdScalarsT<C>& scalars, const ImportanceScalars& importance, double* partials) {
    sgd_kernel<typename Tag::param_t, Tag::ref, Tag::stats, Tag::importance>
        <<<blocks, kBlockThreads, 0, stream>>>(table, scalars, importance, partials);
  }
};

template <typename C>
cudaError_t launch_sgd_step(const TensorLists& lists, const SgdScalarsT<C>& scalars, const Importance* importance,
                            cudaStream_t stream) {
  const bool has_ref = lists.ref_format != RefFormat::kNone;
  if (scalars.has_momentum && lists.states[0] == nullptr) return cudaErrorInvalidValue;
  if (has_ref && lists.references == nullptr) return cudaErrorInvalidValue;
  if (scalars.ewc && (lists.fishers == nullptr || lists.anchors == nullptr)) return cudaErrorInvalidValue;
  if ((scalars.ewc || scalars.project) && importance != nullptr) return cudaErrorInvalidValue;  // see kRules
  void* const* const columns[kSgdDepth<false>] = {lists.params, lists.grads,
                                                  scalars.has_momentum ? lists.states[0] : nullptr,
                                                  has_ref ? lists.references : nullptr,
                                                  scalars.ewc ? lists.fishers : nullptr,
                                                  scalars.ewc ? lists.anchors : nullptr};
  return launch_step<SgdLaunch, C>(lists, columns, scalars, importance, stream);
}

template cudaError_t launch_sgd_step<float>(const TensorLists&, const SgdScalarsT<float>&, const Importance*,
                                            cudaStream_t);
template cudaError_t launch_sgd_step<double>(const TensorLists&, const SgdScalarsT<double>&, const Importance*,
                                             cudaStream_t);

}  // namespace cnl
