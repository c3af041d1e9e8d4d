// What the CPU kernel files share (cnl_cpu_kernels.cpp: the CNL steps; cnl_cpu_kif.cpp: KIF's fusion
// passes): loads and stores of float32 vectors from every 32- and 16-bit parameter dtype (and of
// float64 vectors from float64), and the work items of one call, run by one at::parallel_for.
//
// Compiled into each per-instruction-set library (the CPU_CAPABILITY macros pick Vectorized's
// implementation), like the files that include it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "cnl_cpu_kernels.h"

namespace cnl::cpu {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kW = Vec::size();
constexpr int64_t kVecs = kBlock / kW;  // float vectors per block
static_assert(kBlock % (2 * kW) == 0, "a block holds whole pairs of float vectors (one 16-bit vector)");

// 2 * kW elements of T as two float32 vectors (a 16-bit vector widens into two).
template <typename T>
C10_ALWAYS_INLINE void load_pair(const T* p, Vec& low, Vec& high) {
  if constexpr (std::is_same_v<T, float>) {
    low = Vec::loadu(p);
    high = Vec::loadu(p + kW);
  } else {
    at::vec::load_to_float<T>(p, low, high);
  }
}

// 2 * kW elements rounded to T (round to nearest even).
template <typename T>
C10_ALWAYS_INLINE void store_pair(T* p, const Vec& low, const Vec& high) {
  if constexpr (std::is_same_v<T, float>) {
    low.store(p);
    high.store(p + kW);
  } else {
    at::vec::convert_from_float<T>(low, high).store(p);
  }
}

// A step goes through a block a part at a time: kPart vectors of every stream loaded, updated and
// stored before the next part's, as torch's fused loops go vector by vector. Whole blocks of every
// stream (4 AVX2 vectors each, 8 in float64) exceed the 16 AVX2 registers and went through the
// stack (issue 26). Two vectors: a 16-bit vector widens into two float32 ones.
constexpr int64_t kPart = 2;

// Vectors j and j + 1 of the block of T at p, as float32 vectors.
template <typename T>
C10_ALWAYS_INLINE void load_part(const T* p, Vec (&out)[kVecs], int64_t j) {
  load_pair(p + j * kW, out[j], out[j + 1]);
}

// Vectors j and j + 1 rounded to T (round to nearest even) into the block of T at p.
template <typename T>
C10_ALWAYS_INLINE void store_part(T* p, const Vec (&in)[kVecs], int64_t j) {
  store_pair(p + j * kW, in[j], in[j + 1]);
}

// float64: a block of kBlock elements as double vectors (float64 parameters compute in float64).
using VecD = at::vec::Vectorized<double>;
constexpr int64_t kWD = VecD::size();
constexpr int64_t kVecsD = kBlock / kWD;  // double vectors per block
static_assert(kVecsD % kPart == 0 && kPart * kWD == kW, "a part of double vectors holds one float vector");

C10_ALWAYS_INLINE void load_part(const double* p, VecD (&out)[kVecsD], int64_t j) {
  out[j] = VecD::loadu(p + j * kWD);
  out[j + 1] = VecD::loadu(p + (j + 1) * kWD);
}

C10_ALWAYS_INLINE void store_part(double* p, const VecD (&in)[kVecsD], int64_t j) {
  in[j].store(p + j * kWD);
  in[j + 1].store(p + (j + 1) * kWD);
}

// A whole block of T at p (float32 vectors; double ones for double).
template <typename T, class V, int64_t kN>
C10_ALWAYS_INLINE void load_block(const T* p, V (&out)[kN]) {
  for (int64_t j = 0; j < kN; j += kPart) load_part(p, out, j);
}

template <typename T, class V, int64_t kN>
C10_ALWAYS_INLINE void store_block(T* p, const V (&in)[kN]) {
  for (int64_t j = 0; j < kN; j += kPart) store_part(p, in, j);
}

// Elements [start, end) of tensor `tensor` of a call.
struct WorkItem {
  int64_t tensor, start, end;
};

// The work items of a call: each non-empty tensor cut into items of kItemSize elements (the last shorter).
inline std::vector<WorkItem> work_items(int64_t count, const int64_t* numels) {
  std::vector<WorkItem> items;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t start = 0; start < numels[t]; start += kItemSize) {
      items.push_back({t, start, std::min(numels[t], start + kItemSize)});
    }
  }
  return items;
}

// Runs block(ptrs, offset, element, valid) over the elements [start, end) of one tensor: whole blocks in
// place (offset = element, valid = kBlock), then the partial last block on zero-padded copies of the
// streams (offset 0; `element` still says where it lies, `valid` how many of its elements exist).
// `bits`: bits per element of each stream (2 for sign2 codes); a nullptr stream is passed as nullptr;
// the `written` ones are copied back. Returns the block object (a step's statistics live in it).
template <size_t kStreams, class Block>
Block run_blocks(Block block, void* const (&ptrs)[kStreams], const int (&bits)[kStreams],
                 const bool (&written)[kStreams], int64_t start, int64_t end) {
  // Local copies (the block object is one) the loop can keep in registers: through references, the
  // compiler reloads the pointers and options after every store (it cannot prove the stores do not
  // reach them). KIF's task-vector pass went from 1.19x to 1.09x its bytes floor on one core with them.
  void* base[kStreams];
  for (size_t k = 0; k < kStreams; ++k) base[k] = ptrs[k];
  int64_t i = start;
  for (; i + kBlock <= end; i += kBlock) block(base, i, i, kBlock);
  if (i == end) return block;
  const int64_t valid = end - i;
  alignas(64) unsigned char buffers[kStreams][kBlock * sizeof(double)];
  void* local[kStreams];
  unsigned char* source[kStreams];
  for (size_t k = 0; k < kStreams; ++k) {
    std::memset(buffers[k], 0, sizeof(buffers[k]));
    local[k] = nullptr;
    if (ptrs[k] == nullptr) continue;
    source[k] = static_cast<unsigned char*>(ptrs[k]) + bits[k] * i / 8;  // i: a multiple of kBlock
    std::memcpy(buffers[k], source[k], (bits[k] * valid + 7) / 8);
    local[k] = buffers[k];  // the block then indexes the padded copies from element 0
  }
  block(local, 0, i, valid);
  for (size_t k = 0; k < kStreams; ++k) {
    if (ptrs[k] != nullptr && written[k]) std::memcpy(source[k], buffers[k], (bits[k] * valid + 7) / 8);
  }
  return block;
}

// run(k) for every item k, in parallel unless the call is too small to wake the thread pool.
template <class Run>
void run_items(const std::vector<WorkItem>& items, const Run& run) {
  int64_t total = 0;
  for (const WorkItem& item : items) total += item.end - item.start;
  const int64_t count = static_cast<int64_t>(items.size());
  const auto work = [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) run(k);
  };
  if (total <= 2 * kItemSize) {
    work(0, count);
  } else {
    at::parallel_for(0, count, 1, work);
  }
}

}  // namespace cnl::cpu
