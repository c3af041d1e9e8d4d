// KIF's and Recurrent-KIF's fusion passes on CUDA, multi-tensor: the kernels of
// torch.ops.cnl_ext.kif_task_vector_fuse_ and kif_recurrent_fuse_.
// Math and rounding: cnl_ext/ops/kif_fusion_torch.py (float32, one rounding per operation, the new
// parameter rounded once to its dtype); layout: cnl_multi_tensor.cuh.
#include "cnl_multi_tensor.cuh"

namespace cnl {
namespace {

constexpr int kTaskVectorDepth = 2;  // table columns: param, anchor
constexpr int kRecurrentDepth = 1 + kRecurrentColumns;  // param, θ_b, θ_Q, S_in, U_in, S_out, U_out
static_assert(kFitsKernelArguments<kRecurrentDepth, RecurrentScalars> &&
                  kFitsKernelArguments<kTaskVectorDepth, float*, int64_t*>,
              "tensor table too large for the kernel argument space");

struct NoScalars {};

// ---------------------------------------------------------------------------- KIF

template <typename T, typename A>
struct TaskVectorPtrs {
  T* __restrict__ param;
  const A* __restrict__ anchor;
  const float* __restrict__ coefficients;  // offset to the tensor's first unit
  int64_t div, mod;                        // element f takes coefficients[(f / div) % mod]
};

// θ <- a + c·(θ − a), rounded as the torch backend: ((θ − a)·c) + a.
template <typename T, typename A>
struct TaskVectorStep {
  template <int N>
  static __device__ __forceinline__ void run(const TaskVectorPtrs<T, A>& a, int64_t i, const NoScalars&, StatAcc&) {
    float p[N], anchor[N];
    load<N>(p, a.param, i);
    load<N>(anchor, a.anchor, i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float c = a.coefficients[((i + k) / a.div) % a.mod];
      p[k] = add(mul(sub(p[k], anchor[k]), c), anchor[k]);
    }
    store<N>(a.param, i, p);
  }
};

template <typename T, typename A>
__global__ void __launch_bounds__(kBlockThreads)
    task_vector_kernel(const __grid_constant__ TensorTable<kTaskVectorDepth> table,
                       const float* __restrict__ coefficients, const int64_t* __restrict__ units) {
  const int t = find_tensor(table, blockIdx.x);
  const int64_t start = static_cast<int64_t>(blockIdx.x - table.block_start[t]) * kChunkSize;
  const int64_t end = min(start + kChunkSize, table.numel[t]);
  const int64_t* unit = units + 3 * static_cast<int64_t>(table.tensor_index[t]);  // offset, div, mod
  const TaskVectorPtrs<T, A> a{static_cast<T*>(table.ptr[0][t]), static_cast<const A*>(table.ptr[1][t]),
                               coefficients + unit[0], unit[1], unit[2]};
  const bool vectorizable = aligned_to(a.param, 4 * sizeof(T)) && aligned_to(a.anchor, 4 * sizeof(A));
  StatAcc unused;
  chunk_loop<TaskVectorStep<T, A>>(a, vectorizable, start, end, NoScalars{}, unused);
}

// ---------------------------------------------------------------------------- Recurrent-KIF

template <typename T, typename A>
struct RecurrentPtrs {
  T* __restrict__ param;
  A* __restrict__ anchor;
  const A* __restrict__ inner_end;
  const float* __restrict__ scores[4];  // S_in, U_in, S_out, U_out
};

// θ <- θ_b + w_in·(θ_Q − θ_b) + w_out·(θ − θ_Q), rounded as the torch backend:
// ((θ − θ_Q)·w_out) + (((θ_Q − θ_b)·w_in) + θ_b); then θ_b <- θ as stored with update_anchors.
template <typename T, typename A>
struct RecurrentStep {
  template <int N>
  static __device__ __forceinline__ void run(const RecurrentPtrs<T, A>& a, int64_t i, const RecurrentScalars& s,
                                             StatAcc&) {
    float p[N], b[N], q[N], score[4][N];
    load<N>(p, a.param, i);
    load<N>(b, a.anchor, i);
    load<N>(q, a.inner_end, i);
#pragma unroll
    for (int c = 0; c < 4; ++c) load<N>(score[c], a.scores[c], i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // strict, and a NaN score does not fire
      const bool in = mul(score[0][k], score[1][k]) > s.delta_in;
      const bool out = mul(score[2][k], score[3][k]) > s.delta_out;
      float w_in, w_out;
      if (s.paper_rule) {  // the binary masks of Eq 9
        w_in = in ? 1.0f : 0.0f;
        w_out = out ? 1.0f : 0.0f;
      } else {  // the authors' code: (0.4, 0.6) both, (1, 0) inner only, (0, 1) outer only, (0.5, 0.5) neither
        w_in = in ? (out ? 0.4f : 1.0f) : (out ? 0.0f : 0.5f);
        w_out = in ? (out ? 0.6f : 0.0f) : (out ? 1.0f : 0.5f);
      }
      const float inner = add(mul(sub(q[k], b[k]), w_in), b[k]);
      p[k] = as_stored<T>(add(mul(sub(p[k], q[k]), w_out), inner));
    }
    store<N>(a.param, i, p);
    if (s.update_anchors) store<N>(a.anchor, i, p);  // the parameter as stored, converted to A
  }
};

template <typename T, typename A>
__global__ void __launch_bounds__(kBlockThreads)
    recurrent_kernel(const __grid_constant__ TensorTable<kRecurrentDepth> table, RecurrentScalars s) {
  const int t = find_tensor(table, blockIdx.x);
  const int64_t start = static_cast<int64_t>(blockIdx.x - table.block_start[t]) * kChunkSize;
  const int64_t end = min(start + kChunkSize, table.numel[t]);
  const RecurrentPtrs<T, A> a{static_cast<T*>(table.ptr[0][t]),
                              static_cast<A*>(table.ptr[1][t]),
                              static_cast<const A*>(table.ptr[2][t]),
                              {static_cast<const float*>(table.ptr[3][t]), static_cast<const float*>(table.ptr[4][t]),
                               static_cast<const float*>(table.ptr[5][t]), static_cast<const float*>(table.ptr[6][t])}};
  bool vectorizable = aligned_to(a.param, 4 * sizeof(T)) && aligned_to(a.anchor, 4 * sizeof(A)) &&
                      aligned_to(a.inner_end, 4 * sizeof(A));
  for (int c = 0; c < 4; ++c) vectorizable = vectorizable && aligned_to(a.scores[c], 16);
  StatAcc unused;
  chunk_loop<RecurrentStep<T, A>>(a, vectorizable, start, end, s, unused);
}

// ---------------------------------------------------------------------------- dispatch

template <typename T, typename A>
struct FusionTypes {
  using param_t = T;
  using anchor_t = A;
};

template <typename T, class F>
cudaError_t dispatch_anchor(ParamType anchor, F&& f) {
  switch (anchor) {
    case ParamType::kFloat32:
      return f(FusionTypes<T, float>{});
    case ParamType::kBFloat16:
      return f(FusionTypes<T, __nv_bfloat16>{});
    case ParamType::kFloat16:
      return f(FusionTypes<T, __half>{});
    case ParamType::kFloat64:  // refused by binding::fusion_dtype
      break;
  }
  return cudaErrorInvalidValue;
}

// f(FusionTypes<T, A>) for the parameter and anchor types.
template <class F>
cudaError_t dispatch_fusion(ParamType param, ParamType anchor, F&& f) {
  switch (param) {
    case ParamType::kFloat32:
      return dispatch_anchor<float>(anchor, f);
    case ParamType::kBFloat16:
      return dispatch_anchor<__nv_bfloat16>(anchor, f);
    case ParamType::kFloat16:
      return dispatch_anchor<__half>(anchor, f);
    case ParamType::kFloat64:  // refused by binding::fusion_dtype
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_task_vector_fuse(const TensorLists& lists, ParamType anchor_type, void* const* anchors,
                                    const float* coefficients, const int64_t* units, cudaStream_t stream) {
  if (anchors == nullptr || coefficients == nullptr || units == nullptr) return cudaErrorInvalidValue;
  void* const* const columns[kTaskVectorDepth] = {lists.params, anchors};
  return dispatch_fusion(lists.param_type, anchor_type, [&](auto types) {
    using Types = decltype(types);
    return for_each_table<kTaskVectorDepth>(
        lists, columns, false, stream, [&](const TensorTable<kTaskVectorDepth>& table, unsigned blocks) {
          task_vector_kernel<typename Types::param_t, typename Types::anchor_t>
              <<<blocks, kBlockThreads, 0, stream>>>(table, coefficients, units);
        });
  });
}

cudaError_t launch_recurrent_fuse(const TensorLists& lists, ParamType anchor_type,
                                  void* const* const (&columns)[kRecurrentColumns], const RecurrentScalars& scalars,
                                  cudaStream_t stream) {
  void* const* all[kRecurrentDepth] = {lists.params};
  for (int c = 1; c < kRecurrentDepth; ++c) {
    if (columns[c - 1] == nullptr) return cudaErrorInvalidValue;
    all[c] = columns[c - 1];
  }
  return dispatch_fusion(lists.param_type, anchor_type, [&](auto types) {
    using Types = decltype(types);
    return for_each_table<kRecurrentDepth>(
        lists, all, false, stream, [&](const TensorTable<kRecurrentDepth>& table, unsigned blocks) {
          recurrent_kernel<typename Types::param_t, typename Types::anchor_t>
              <<<blocks, kBlockThreads, 0, stream>>>(table, scalars);
        });
  });
}

}  // namespace cnl
