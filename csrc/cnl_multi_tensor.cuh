// Multi-tensor machinery shared by the SGD, Adam and KIF kernels: the per-launch tensor table, vector
// loads and stores, the CNL mask, KIF's importance EMAs, the statistics reduction and the host loop
// that cuts a tensor list into launches.
//
// Layout (Apex's multi_tensor_apply): the table travels as a kernel argument, so a launch needs no
// host-to-device copy, no allocation and no synchronization, and it can be captured in a CUDA
// graph. Each block handles one chunk of kChunkSize elements; instead of one table row per chunk
// (Apex) the table holds one row per tensor with the prefix sum of chunk counts, and a block finds
// its tensor by binary search. That fits 44 (Adam) to 61 (SGD) tensors in the 4 KiB argument space
// whatever their sizes (37 and 49 with the two importance columns; both count EWC's two columns), so a
// 338-tensor model takes 8 Adam launches. Offsets are 64-bit throughout.
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cnl_common.h"

namespace cnl {

// ---------------------------------------------------------------------------- the tensor table

// Kernel arguments are limited to 4096 bytes; leave room for the scalars and the partials pointer.
constexpr int kTableBytes = 3968;

template <int kDepth>
struct TensorTable {
  // Row count chosen so that the table fills (without exceeding) kTableBytes.
  static constexpr int kMaxTensors = (kTableBytes - 32) / (8 * kDepth + 16);

  void* ptr[kDepth][kMaxTensors];           // column-major: ptr[column][tensor]
  int64_t numel[kMaxTensors];
  int64_t partial_base;                     // index of this launch's first block in `partials`
  int32_t block_start[kMaxTensors + 1];     // first block of each tensor; strictly increasing
  int32_t tensor_index[kMaxTensors];        // row in `stats` (index in the op's lists)
  int32_t num_tensors;
};

// Whether a kernel taking a TensorTable<kDepth> and `Args` fits the 4 KiB of kernel arguments (not
// relying on CUDA 12.1's larger limit, so that the same code builds and runs with any 11.8+/12.x
// toolkit and driver).
template <int kDepth, class... Args>
constexpr bool kFitsKernelArguments = sizeof(TensorTable<kDepth>) + (sizeof(Args) + ... + 0) <= 4096;

template <int kDepth>
__device__ __forceinline__ int find_tensor(const TensorTable<kDepth>& table, int block) {
  // Last t with block_start[t] <= block. Uniform across the block: every thread reads the same
  // argument words, which the constant cache broadcasts.
  int lo = 0, hi = table.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.block_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ---------------------------------------------------------------------------- arithmetic
// Every operation rounded separately, in the order of the reference (cnl_ext/ops/torch_backend.py):
// the _rn intrinsics are never contracted into FMAs and stay IEEE-exact even under --use_fast_math,
// so results do not depend on compiler flags or on the architecture. In float32, and in float64
// for the steps of float64 parameters.

__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// torch.maximum: NaN if either input is NaN (fmax would drop it).
template <typename C>
__device__ __forceinline__ C nan_max(C a, C b) { return (a > b || a != a) ? a : b; }

// ---------------------------------------------------------------------------- loads and stores

// A stored element in its compute type (exact), and back (rounded to nearest even).
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ double widen(double x) { return x; }

template <typename T>
__device__ __forceinline__ T narrow(Compute<T> x);
template <>
__device__ __forceinline__ float narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ double narrow<double>(double x) { return x; }

// A compute value as float32 (double rounded to nearest): what KIF's float32 importance EMAs read.
__device__ __forceinline__ float to_float32(float x) { return x; }
__device__ __forceinline__ float to_float32(double x) { return __double2float_rn(x); }

// N == kVec: one aligned vector access of 4 * sizeof(T) bytes (16 for float32, 8 for 16-bit types,
// 32 for float64: two 16-byte accesses); N == 1: scalar.
template <int N, typename T>
__device__ __forceinline__ void load(Compute<T> (&out)[N], const T* __restrict__ base, int64_t i) {
  if constexpr (N == 1) {
    out[0] = widen(base[i]);
  } else {
    static_assert(N == 4, "vector width is 4 elements");
    struct alignas(4 * sizeof(T)) Pack { T v[4]; };
    const Pack pack = *reinterpret_cast<const Pack*>(base + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = widen(pack.v[k]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store(T* __restrict__ base, int64_t i, const Compute<T> (&in)[N]) {
  if constexpr (N == 1) {
    base[i] = narrow<T>(in[0]);
  } else {
    struct alignas(4 * sizeof(T)) Pack { T v[4]; };
    Pack pack;
#pragma unroll
    for (int k = 0; k < 4; ++k) pack.v[k] = narrow<T>(in[k]);
    *reinterpret_cast<Pack*>(base + i) = pack;
  }
}

// Reference values in the compute type C: the stored value, or -1/0/+1 for the sign formats.
template <RefFormat kRef>
struct RefStorage;
template <>
struct RefStorage<RefFormat::kNone> { using type = float; };
template <>
struct RefStorage<RefFormat::kFloat32> { using type = float; };
template <>
struct RefStorage<RefFormat::kBFloat16> { using type = __nv_bfloat16; };
template <>
struct RefStorage<RefFormat::kInt8> { using type = int8_t; };
template <>
struct RefStorage<RefFormat::kSign2> { using type = uint8_t; };

__device__ __forceinline__ float float_of(int8_t x) { return static_cast<float>(x); }
__device__ __forceinline__ float float_of(float x) { return x; }
__device__ __forceinline__ float float_of(__nv_bfloat16 x) { return __bfloat162float(x); }

// 2-bit code (0 zero, 1 positive, 2 negative; 3 unused, read as zero) to a sign.
__device__ __forceinline__ float sign2_value(unsigned code) {
  return code == 1u ? 1.0f : (code == 2u ? -1.0f : 0.0f);
}

template <int N, RefFormat kRef, typename C>
__device__ __forceinline__ void load_reference(C (&out)[N], const void* __restrict__ base, int64_t i) {
  if constexpr (kRef == RefFormat::kNone) {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = C(0);
  } else if constexpr (kRef == RefFormat::kSign2) {
    // Element i sits at bits 2*(i%4) of byte i/4. With N == 4, i is a multiple of 4: one byte.
    const unsigned byte = static_cast<const uint8_t*>(base)[i >> 2];
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = static_cast<C>(sign2_value((byte >> (2 * ((i + k) & 3))) & 3u));
  } else {
    using R = typename RefStorage<kRef>::type;
    const R* ref = static_cast<const R*>(base);
    if constexpr (N == 1) {
      out[0] = static_cast<C>(float_of(ref[i]));
    } else {
      struct alignas(4 * sizeof(R)) Pack { R v[4]; };
      const Pack pack = *reinterpret_cast<const Pack*>(ref + i);
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = static_cast<C>(float_of(pack.v[k]));
    }
  }
}

// Whether the step kernels of that importance flag apply issue 22's terms (Scalars::ewc / ::project) in
// their pass: only those without KIF's EMAs (with both, float64 Adam with statistics spilled registers).
// launch_sgd_step / launch_adam_step refuse the terms with importance (cudaErrorInvalidValue); the host
// (cnl_ext/ops/native_backend.py) then steps with the terms and updates the EMAs right after the step.
template <bool kImportance>
constexpr bool kRules = !kImportance;

// g (as passed) <- maximize's sign, then issue 22's terms (cnl_ext/ops/rules.py), each operation
// rounded on its own: g - c*r (A-GEM: Scalars::project), then + 2*lambda*(F*(p - anchor)) (EWC:
// Scalars::ewc; F float32, the anchor in the parameter's type). In place, before the other streams
// are loaded, so that F and the anchor take no registers during the step.
template <int N, typename T, class Scalars>
__device__ __forceinline__ void rule_gradient(Compute<T> (&g)[N], const Compute<T> (&p)[N], const Compute<T> (&r)[N],
                                              const Scalars& s, const float* __restrict__ fisher,
                                              const T* __restrict__ anchor_base, int64_t i) {
#pragma unroll
  for (int k = 0; k < N; ++k) g[k] = s.maximize ? -g[k] : g[k];
  if (s.project) {
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] = sub(g[k], mul(s.agem_coefficient, r[k]));
  }
  if (s.ewc) {
    float f32[N];
    Compute<T> anchor[N];
    load<N>(f32, fisher, i);
    load<N>(anchor, anchor_base, i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      g[k] = add(g[k], mul(s.ewc_two_lambda, mul(static_cast<Compute<T>>(f32[k]), sub(p[k], anchor[k]))));
    }
  }
}

// Bytes a reference pointer must be aligned to for vector loads.
template <RefFormat kRef>
__host__ __device__ constexpr unsigned reference_alignment() {
  return kRef == RefFormat::kSign2 || kRef == RefFormat::kNone
             ? 1u
             : 4u * static_cast<unsigned>(sizeof(typename RefStorage<kRef>::type));
}

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// ---------------------------------------------------------------------------- the CNL mask

// Per-thread statistics: collaborative count, sums of s = r*u over collaborative and conflicting
// elements. Sums in double: a thread sees at most kChunkSize / kBlockThreads elements, and the
// kernel is memory-bound, so the wider adds cost nothing measurable.
struct StatAcc {
  int count = 0;
  double collaborative = 0.0;
  double conflicting = 0.0;
};

// The element's new value: `p_new` unless u conflicts in sign with r (spec: sign(r)*sign(u) < 0,
// so zeros and NaNs are collaborative), then `p` unchanged.
template <RefFormat kRef, bool kStats, typename C>
__device__ __forceinline__ C cnl_select(C p, C p_new, C u, C r, StatAcc& acc) {
  if constexpr (kRef == RefFormat::kNone) {
    return p_new;
  } else {
    const bool conflict = (r > C(0) && u < C(0)) || (r < C(0) && u > C(0));
    if constexpr (kStats) {
      const C s = mul(r, u);  // product in the compute type, as the reference computes it
      if (conflict) {
        acc.conflicting += static_cast<double>(s);
      } else {
        acc.count += 1;
        acc.collaborative += static_cast<double>(s);
      }
    }
    return conflict ? p : p_new;
  }
}

// ---------------------------------------------------------------------------- importance

// The value an element has once stored as T, in its compute type.
template <typename T>
__device__ __forceinline__ Compute<T> as_stored(Compute<T> x) {
  return widen(narrow<T>(x));
}

// KIF's EMAs of one element, in the order of operations of cnl_ext/ops/importance.py (each
// operation rounded on its own): `w` the new parameter as stored, `g` the gradient as passed.
__device__ __forceinline__ void update_importance(const ImportanceScalars& s, float w, float g, float& sensitivity,
                                                  float& uncertainty) {
  const float x = mul(w, g);
  const float importance = s.kind == ImportanceKind::kFirst ? fabsf(x) : fabsf(sub(x, mul(mul(x, x), 0.5f)));
  sensitivity = add(mul(sensitivity, s.beta1), mul(importance, s.one_minus_beta1));
  // |I - S| of the new S (Eq 11)
  uncertainty = add(mul(uncertainty, s.beta2), mul(fabsf(sub(importance, sensitivity)), s.one_minus_beta2));
}

// With kImportance, loads the EMAs of [i, i + N) of the tensor's `sensitivity` / `uncertainty`;
// update_and_store then updates and stores them from the stored params `p` and the grads `g`.
template <bool kImportance, int N>
struct ImportanceBlock {
  float sensitivity[N], uncertainty[N];

  __device__ __forceinline__ void load_from(const float* __restrict__ s, const float* __restrict__ u, int64_t i) {
    if constexpr (kImportance) {
      load<N>(sensitivity, s, i);
      load<N>(uncertainty, u, i);
    }
  }

  // float64 parameters and gradients are read rounded to float32, as the float32 EMAs of
  // cnl_ext/ops/importance.py read them.
  template <typename T>
  __device__ __forceinline__ void update_and_store(const ImportanceScalars& scalars, const Compute<T> (&p)[N],
                                                   const Compute<T> (&g)[N], float* __restrict__ s,
                                                   float* __restrict__ u, int64_t i) {
    if constexpr (kImportance) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        update_importance(scalars, to_float32(as_stored<T>(p[k])), to_float32(g[k]), sensitivity[k], uncertainty[k]);
      }
      store<N>(s, i, sensitivity);
      store<N>(u, i, uncertainty);
    }
  }
};

// ---------------------------------------------------------------------------- the chunk loop

// Runs Step::run<N>(ptrs, i, scalars, acc) over [start, end): vectors of kVec elements when every
// pointer of the tensor is aligned for them, then the (< kVec) tail or everything one element at
// a time. Consecutive threads touch consecutive addresses in both loops (coalesced).
template <class Step, class Ptrs, class Scalars>
__device__ __forceinline__ void chunk_loop(const Ptrs& ptrs, bool vectorizable, int64_t start, int64_t end,
                                           const Scalars& scalars, StatAcc& acc) {
  int64_t scalar_start = start;
  if (vectorizable) {
    const int64_t vec_end = start + ((end - start) / kVec) * kVec;
    for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
         i += static_cast<int64_t>(blockDim.x) * kVec) {
      Step::template run<kVec>(ptrs, i, scalars, acc);
    }
    scalar_start = vec_end;
  }
  for (int64_t i = scalar_start + threadIdx.x; i < end; i += blockDim.x) {
    Step::template run<1>(ptrs, i, scalars, acc);
  }
}

// ---------------------------------------------------------------------------- statistics

// Block-wide sum of the three statistics in a fixed order; thread 0 gets the result.
__device__ __forceinline__ void block_sum(double& a, double& b, double& c) {
  __shared__ double shared[3][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
    c += __shfl_down_sync(0xffffffffu, c, offset);
  }
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
    shared[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    a = lane < warps ? shared[0][lane] : 0.0;
    b = lane < warps ? shared[1][lane] : 0.0;
    c = lane < warps ? shared[2][lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      b += __shfl_down_sync(0xffffffffu, b, offset);
      c += __shfl_down_sync(0xffffffffu, c, offset);
    }
  }
}

// The block's partial row (count, collaborative sum, conflicting sum) into `row`.
__device__ __forceinline__ void write_partials(StatAcc& acc, double* __restrict__ row) {
  double count = static_cast<double>(acc.count);
  block_sum(count, acc.collaborative, acc.conflicting);
  if (threadIdx.x == 0) {
    row[0] = count;
    row[1] = acc.collaborative;
    row[2] = acc.conflicting;
  }
}

// One block per tensor of a launch: stats[tensor] += sum of its blocks' partial rows.
template <int kDepth>
__global__ void __launch_bounds__(256) reduce_partials_kernel(const __grid_constant__ TensorTable<kDepth> table,
                                                              const double* __restrict__ partials,
                                                              double* __restrict__ stats) {
  const int t = blockIdx.x;
  const int64_t first = table.partial_base + table.block_start[t];
  const int64_t last = table.partial_base + table.block_start[t + 1];
  double a = 0.0, b = 0.0, c = 0.0;
  for (int64_t k = first + threadIdx.x; k < last; k += blockDim.x) {
    a += partials[3 * k + 0];
    b += partials[3 * k + 1];
    c += partials[3 * k + 2];
  }
  block_sum(a, b, c);
  if (threadIdx.x == 0) {
    double* row = stats + 3 * static_cast<int64_t>(table.tensor_index[t]);
    row[0] += a;
    row[1] += b;
    row[2] += c;
  }
}

// ---------------------------------------------------------------------------- host side

// Fills tables of up to kMaxTensors non-empty tensors (columns[c][i], c < kDepth, is tensor i's
// pointer for column c, a nullptr column gives nullptr entries) and calls launch(table, num_blocks)
// for each, then the statistics reduction when `stats` is set. Empty tensors take no block and no row.
template <int kDepth, class Launch>
cudaError_t for_each_table(const TensorLists& lists, void* const* const* columns, bool stats, cudaStream_t stream,
                           Launch&& launch) {
  using Table = TensorTable<kDepth>;
  Table table;
  table.partial_base = 0;
  table.num_tensors = 0;
  table.block_start[0] = 0;
  int64_t blocks = 0;  // of the table being filled

  auto flush = [&]() -> cudaError_t {
    if (table.num_tensors == 0) return cudaSuccess;
    table.block_start[table.num_tensors] = static_cast<int32_t>(blocks);
    launch(table, static_cast<unsigned>(blocks));
    if (stats) {
      reduce_partials_kernel<kDepth><<<table.num_tensors, 256, 0, stream>>>(table, lists.partials, lists.stats);
    }
    const cudaError_t err = cudaGetLastError();
    table.partial_base += blocks;
    table.num_tensors = 0;
    blocks = 0;
    return err;
  };

  // grid.x may reach 2^31 - 1; block_start is int32.
  constexpr int64_t kMaxBlocks = 2147483647;
  for (int64_t i = 0; i < lists.count; ++i) {
    const int64_t n = lists.numels[i];
    if (n <= 0) continue;
    const int64_t chunks = (n + kChunkSize - 1) / kChunkSize;
    if (chunks > kMaxBlocks) return cudaErrorInvalidValue;  // > 2^47 elements in one tensor
    if (table.num_tensors == Table::kMaxTensors || blocks + chunks > kMaxBlocks) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int slot = table.num_tensors++;
    for (int c = 0; c < kDepth; ++c) table.ptr[c][slot] = columns[c] == nullptr ? nullptr : columns[c][i];
    table.numel[slot] = n;
    table.block_start[slot] = static_cast<int32_t>(blocks);
    table.tensor_index[slot] = static_cast<int32_t>(i);
    blocks += chunks;
  }
  return flush();
}

// Calls f(tag) with the KernelTag of the runtime parameter type, reference format, statistics and
// importance flags, so each kernel is compiled for exactly the combinations the op can take.
template <typename T, RefFormat kRef, bool kStats, bool kImportance>
struct KernelTag {
  using param_t = T;
  static constexpr RefFormat ref = kRef;
  static constexpr bool stats = kStats;
  static constexpr bool importance = kImportance;
};

template <typename T, bool kImportance, class F>
cudaError_t dispatch_reference(RefFormat ref, bool stats, F&& f) {
  switch (ref) {
    case RefFormat::kNone:
      return f(KernelTag<T, RefFormat::kNone, false, kImportance>{});
    case RefFormat::kFloat32:
      return stats ? f(KernelTag<T, RefFormat::kFloat32, true, kImportance>{})
                   : f(KernelTag<T, RefFormat::kFloat32, false, kImportance>{});
    case RefFormat::kBFloat16:
      return stats ? f(KernelTag<T, RefFormat::kBFloat16, true, kImportance>{})
                   : f(KernelTag<T, RefFormat::kBFloat16, false, kImportance>{});
    case RefFormat::kInt8:
      return stats ? f(KernelTag<T, RefFormat::kInt8, true, kImportance>{})
                   : f(KernelTag<T, RefFormat::kInt8, false, kImportance>{});
    case RefFormat::kSign2:
      return stats ? f(KernelTag<T, RefFormat::kSign2, true, kImportance>{})
                   : f(KernelTag<T, RefFormat::kSign2, false, kImportance>{});
  }
  return cudaErrorInvalidValue;
}

template <typename T, class F>
cudaError_t dispatch_importance(RefFormat ref, bool stats, bool importance, F&& f) {
  return importance ? dispatch_reference<T, true>(ref, stats, f) : dispatch_reference<T, false>(ref, stats, f);
}

// Only the parameter types whose compute type is C (the type of the step's scalars): float64 for
// double, the others for float; any other pairing is cudaErrorInvalidValue.
template <typename C, class F>
cudaError_t dispatch(ParamType param, RefFormat ref, bool stats, bool importance, F&& f) {
  if constexpr (std::is_same_v<C, double>) {
    if (param == ParamType::kFloat64) return dispatch_importance<double>(ref, stats, importance, f);
  } else {
    switch (param) {
      case ParamType::kFloat32:
        return dispatch_importance<float>(ref, stats, importance, f);
      case ParamType::kBFloat16:
        return dispatch_importance<__nv_bfloat16>(ref, stats, importance, f);
      case ParamType::kFloat16:
        return dispatch_importance<__half>(ref, stats, importance, f);
      case ParamType::kFloat64:
        break;
    }
  }
  return cudaErrorInvalidValue;
}

// The host launch loop of every step op: checks the importance and statistics pointers, then, for the
// runtime parameter type, reference format, statistics and importance (dispatch), launches
// Launch::launch<Tag>(table, blocks, stream, scalars, importance scalars, partials) per table of
// `columns` (kColumns, nullptr where unused), with the two EMA columns after them under importance.
template <class Launch, typename C, int kColumns, class Scalars>
cudaError_t launch_step(const TensorLists& lists, void* const* const (&columns)[kColumns], const Scalars& scalars,
                        const Importance* importance, cudaStream_t stream) {
  if (importance != nullptr && (importance->sensitivities == nullptr || importance->uncertainties == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool stats = lists.ref_format != RefFormat::kNone && lists.stats != nullptr;
  if (stats && lists.partials == nullptr) return cudaErrorInvalidValue;
  void* const* all_columns[kColumns + 2];
  for (int c = 0; c < kColumns; ++c) all_columns[c] = columns[c];
  all_columns[kColumns] = importance ? importance->sensitivities : nullptr;
  all_columns[kColumns + 1] = importance ? importance->uncertainties : nullptr;
  const ImportanceScalars importance_scalars = importance ? importance->scalars : ImportanceScalars{};
  return dispatch<C>(lists.param_type, lists.ref_format, stats, importance != nullptr, [&](auto tag) {
    using Tag = decltype(tag);
    constexpr int kDepth = Tag::importance ? kColumns + 2 : kColumns;  // the first kDepth columns
    return for_each_table<kDepth>(lists, all_columns, stats, stream, [&](const TensorTable<kDepth>& table,
                                                                         unsigned blocks) {
      Launch::template launch<Tag>(table, blocks, stream, scalars, importance_scalars, lists.partials);
    });
  });
}

}  // namespace cnl
