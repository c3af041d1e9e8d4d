// The CPU kernels of the CNL ops (cnl_cpu_kernels.cpp), called by the bindings (cnl_cpu_ops.cpp).
//
// Both files are compiled once per instruction set (DEFAULT, AVX2, AVX512: the CPU_CAPABILITY
// macros of ATen's own build) into one library per instruction set; a process loads exactly one.
#pragma once

#include "cnl_types.h"

namespace cnl::cpu {

// Elements of one parallel work item: a tensor is cut into items of this size (the last one
// shorter), and one at::parallel_for runs over the items of all tensors of the call. Statistics
// are summed per item and then per tensor in item order, so they do not depend on the threads.
constexpr int64_t kItemSize = 32768;
// Elements of one step of the inner loop on every instruction set (2 AVX-512 vectors, 4 AVX2
// vectors): the statistics keep one accumulator per position in the block, which makes them
// bit-identical across instruction sets.
constexpr int64_t kBlock = 32;

// The instruction set this library was compiled for ("DEFAULT", "AVX2", "AVX512").
const char* capability();

// In place, as the ops contract says; `lists` as validated by cnl_binding.h (host pointers).
// masked_delta: `lists.grads` holds the parameters before the step (`befores`). `importance`:
// nullptr, or the EMAs the step also updates.
// float64 parameters (ParamType::kFloat64) take the double scalars and compute in float64 with float64
// states; the other dtypes take the float ones.
void sgd_step(const TensorLists& lists, const SgdScalars& scalars, const Importance* importance = nullptr);
void sgd_step(const TensorLists& lists, const SgdScalarsT<double>& scalars, const Importance* importance = nullptr);
void adam_step(const TensorLists& lists, const AdamScalars& scalars, const Importance* importance = nullptr);
void adam_step(const TensorLists& lists, const AdamScalarsT<double>& scalars, const Importance* importance = nullptr);
void masked_delta(const TensorLists& lists, double inv_lr);
// A-GEM's reduction: out[t] += sum of grads[t] * references[t] (lists.grads, lists.references,
// lists.ref_format; lists.param_type the gradients' dtype), products in the compute type, in double
// per item and then per tensor in item order (deterministic).
void agem_dot(const TensorLists& lists, double* out);

}  // namespace cnl::cpu
