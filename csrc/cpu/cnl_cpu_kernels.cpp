// CPU kernels of the CNL steps: one pass per element, vectorized with ATen's Vectorized<float>
// (Vectorized<double> for float64 parameters), parallel over (tensor, item) work items of all tensors
// of the call with one at::parallel_for.
//
// Rounding: every operation is a separate IEEE operation in the compute type (float32; float64 for
// float64 parameters, whose states are float64 too) in the order of the PyTorch backend
// (cnl_ext/ops/torch_backend.py), compiled with -ffp-contract=off and without Vectorized::fmadd, so
// the result does not depend on the instruction set. The new parameter is rounded once to the
// parameter dtype (round to nearest even) on store. Elements that keep their value are stored
// too: the round trip through the compute type is exact for every parameter dtype.
#include "cnl_cpu_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cnl_cpu_vec.h"

// AVX2: the loops over the parts of a block, and over a part's vectors, fully unrolled. With a
// reference, GCC 12 leaves an AVX2 block's loop rolled, the block's arrays then go through the stack
// (every vector stored and reloaded once more) and the options are tested per vector (issue 26). Only
// where it was measured: AVX512's float32 blocks are one part, which GCC unrolls itself.
#if defined(CPU_CAPABILITY_AVX2)
#define CNL_UNROLL_BLOCK _Pragma("GCC unroll 16")
#else
#define CNL_UNROLL_BLOCK
#endif

#define CNL_STRINGIFY_(x) #x
#define CNL_STRINGIFY(x) CNL_STRINGIFY_(x)

namespace cnl::cpu {
namespace {

using IVec = at::vec::Vectorized<int32_t>;

static_assert(IVec::size() == kW, "int32 and float vectors have the same lanes");
static_assert(kItemSize % kBlock == 0, "items start on block boundaries (and on sign2 byte boundaries)");

template <typename C>
using VecOf = at::vec::Vectorized<C>;

// ---------------------------------------------------------------------------- loads

// A float32 vector widened to two float64 vectors (exact) / a block of float64 vectors rounded to
// float32 (to nearest even, as torch's float64 -> float32 copy).
C10_ALWAYS_INLINE void widen(const Vec& in, VecD& low, VecD& high) {
#if defined(CPU_CAPABILITY_AVX512)
  low = VecD(_mm512_cvtps_pd(_mm512_castps512_ps256(in)));
  high = VecD(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(in), 1))));
#elif defined(CPU_CAPABILITY_AVX2)
  low = VecD(_mm256_cvtps_pd(_mm256_castps256_ps128(in)));
  high = VecD(_mm256_cvtps_pd(_mm256_extractf128_ps(in, 1)));
#else
  alignas(64) float narrow[kW];
  alignas(64) double wide[kW];
  in.store(narrow);
  for (int64_t k = 0; k < kW; ++k) wide[k] = static_cast<double>(narrow[k]);
  low = VecD::loadu(wide);
  high = VecD::loadu(wide + kWD);
#endif
}

C10_ALWAYS_INLINE void narrow_block(const VecD (&in)[kVecsD], Vec (&out)[kVecs]) {
  alignas(64) double wide[kBlock];
  alignas(64) float narrow[kBlock];
  store_block(wide, in);
  for (int64_t k = 0; k < kBlock; ++k) narrow[k] = static_cast<float>(wide[k]);
  load_block(narrow, out);
}

// kBlock elements rounded to T (round to nearest even), as store_block; `in` then holds the values
// as stored (float32), which the importance EMAs read.
template <typename T>
C10_ALWAYS_INLINE void store_block_as_stored(T* p, Vec (&in)[kVecs]) {
  if constexpr (std::is_same_v<T, float>) {
    store_block(p, in);
  } else {
    for (int64_t j = 0; j < kVecs; j += 2) {
      const auto rounded = at::vec::convert_from_float<T>(in[j], in[j + 1]);
      rounded.store(p + j * kW);
      std::tie(in[j], in[j + 1]) = at::vec::convert_to_float<T>(rounded);
    }
  }
}

// int32 lanes to float32 (exact for the small values used here).
C10_ALWAYS_INLINE Vec int32_to_float(const IVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_cvtepi32_ps(v));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_cvtepi32_ps(v));
#else
  return at::vec::convert_to_fp_of_same_size<float>(v);
#endif
}

// kW int8 values to float32.
C10_ALWAYS_INLINE Vec int8_to_float(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  alignas(64) float buffer[kW];
  for (int64_t k = 0; k < kW; ++k) buffer[k] = static_cast<float>(p[k]);
  return Vec::loadu(buffer);
#endif
}

// Reference values of kW elements starting at element e (a multiple of kW): the stored value, or
// -1/0/+1 for the sign formats (sign2 code 0 zero, 1 positive, 2 negative, 3 unused and read as zero).
template <RefFormat kRef>
C10_ALWAYS_INLINE Vec load_reference_vector(const void* base, int64_t e) {
  if constexpr (kRef == RefFormat::kFloat32) {
    return Vec::loadu(static_cast<const float*>(base) + e);
  } else if constexpr (kRef == RefFormat::kBFloat16) {
    Vec out;
    at::vec::load_to_float(static_cast<const c10::BFloat16*>(base) + e, out);
    return out;
  } else if constexpr (kRef == RefFormat::kInt8) {
    return int8_to_float(static_cast<const int8_t*>(base) + e);
  } else {
    static_assert(kRef == RefFormat::kSign2);
    // kW codes (2*kW bits): lane l takes bits 2l, 2l+1 of the vector's word.
    uint32_t word = 0;
    std::memcpy(&word, static_cast<const uint8_t*>(base) + e / 4, kW / 4);  // little-endian: byte b at bits 8b
    const IVec codes = (IVec(static_cast<int32_t>(word)) >> IVec::arange(0, 2)) & IVec(3);
    return int32_to_float((codes & IVec(1)) - (codes >> IVec(1)));
  }
}

// Vectors j and j + 1 of the reference values of the block at element i.
template <RefFormat kRef>
C10_ALWAYS_INLINE void load_reference(const void* base, int64_t i, Vec (&out)[kVecs], int64_t j) {
  const int64_t e = i + j * kW;
  if constexpr (kRef == RefFormat::kFloat32) {
    load_pair(static_cast<const float*>(base) + e, out[j], out[j + 1]);
  } else if constexpr (kRef == RefFormat::kBFloat16) {
    load_pair(static_cast<const c10::BFloat16*>(base) + e, out[j], out[j + 1]);
#if defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (kRef == RefFormat::kSign2) {
    // Decode-bound otherwise (issue 26): one 32-bit broadcast per two vectors, then per vector a
    // shift that brings lane l's code to its low bits and a permute that looks the value up (the
    // permute reads 3 bits: the code and the next code's low bit, hence the table repeats).
    const __m256 values = _mm256_setr_ps(0.0f, 1.0f, -1.0f, 0.0f, 0.0f, 1.0f, -1.0f, 0.0f);
    const __m256i shifts_low = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i shifts_high = _mm256_add_epi32(shifts_low, _mm256_set1_epi32(16));
    int32_t codes = 0;
    std::memcpy(&codes, static_cast<const uint8_t*>(base) + e / 4, sizeof(codes));  // vectors j and j + 1
    const __m256i word = _mm256_set1_epi32(codes);
    out[j] = Vec(_mm256_permutevar8x32_ps(values, _mm256_srlv_epi32(word, shifts_low)));
    out[j + 1] = Vec(_mm256_permutevar8x32_ps(values, _mm256_srlv_epi32(word, shifts_high)));
#endif
  } else {
    out[j] = load_reference_vector<kRef>(base, e);
    out[j + 1] = load_reference_vector<kRef>(base, e + kW);
  }
}

// The same as float64 (float64 steps: every format's value is exact in float32, hence in float64).
template <RefFormat kRef>
C10_ALWAYS_INLINE void load_reference(const void* base, int64_t i, VecD (&out)[kVecsD], int64_t j) {
  widen(load_reference_vector<kRef>(base, i + j * kWD), out[j], out[j + 1]);
}

// ---------------------------------------------------------------------------- the CNL mask

// Statistics per position of the block (the same lane layout on every instruction set): the
// collaborative count and the sums of s = r*u over collaborative and conflicting elements. The
// kernels add into lanes of the compute type (BlockStats), which are added into double
// every kStatGroup blocks (StatAcc): each float32 lane sums at most kStatGroup terms of one sign
// (s >= 0 where collaborative, s <= 0 where conflicting), a relative error of at most
// kStatGroup * 2^-24, far below the tests' tolerance, at a fraction of the cost of widening every vector.
// (float64 steps compute s and its sums in double throughout.)
constexpr int kStatGroup = 32;

// Three arrays of kBlock / V::size() vectors V (count, collaborative sum, conflicting sum), locals of
// the item loop. (GCC 12 keeps them on the stack, not in registers: a store-to-load round trip per
// vector that the memory-bound loop mostly hides.)
template <class V>
struct BlockStats {
  static constexpr int64_t kN = kBlock / V::size();
  V* count;
  V* collaborative;
  V* conflicting;

  C10_ALWAYS_INLINE void clear() const {
    for (int64_t j = 0; j < kN; ++j) count[j] = collaborative[j] = conflicting[j] = V(0);
  }
};

struct StatAcc {
  double count[kBlock] = {}, collaborative[kBlock] = {}, conflicting[kBlock] = {};

  // Adds the lanes of `block` (position by position) and clears them.
  template <class V>
  C10_ALWAYS_INLINE void flush(const BlockStats<V>& block) {
    constexpr int64_t kLanes = V::size();
    alignas(64) typename V::value_type values[3][kBlock];
    for (int64_t j = 0; j < BlockStats<V>::kN; ++j) {
      block.count[j].store(values[0] + j * kLanes);
      block.collaborative[j].store(values[1] + j * kLanes);
      block.conflicting[j].store(values[2] + j * kLanes);
    }
    for (int64_t k = 0; k < kBlock; ++k) {
      count[k] += values[0][k];
      collaborative[k] += values[1][k];
      conflicting[k] += values[2][k];
    }
    block.clear();
  }

  // Sums of the kBlock positions in position order, added to row[0..2].
  void add_to(double* row) const {
    for (int64_t k = 0; k < kBlock; ++k) {
      row[0] += count[k];
      row[1] += collaborative[k];
      row[2] += conflicting[k];
    }
  }
};

// All-ones lanes where the element of vector j of the block exists (a block at the end of an item
// may be partial; its missing lanes hold zeros and must not count).
template <class V>
C10_ALWAYS_INLINE V valid_lanes(int64_t j, int64_t valid) {
  using C = typename V::value_type;
  if (valid >= kBlock) return V(C(0)) == V(C(0));
  return V::arange(static_cast<C>(j * V::size()), C(1)) < V(static_cast<C>(valid));
}

// All-ones lanes where sign(r)*sign(u) < 0 (zeros and NaNs are collaborative). kIntegerReference:
// r holds integers (the sign formats), so r*u is zero or NaN where r or u is, and otherwise nonzero
// with the sign sign(r)*sign(u) (|r| >= 1: no underflow): two instructions instead of seven.
template <bool kIntegerReference, class V>
C10_ALWAYS_INLINE V conflict_lanes(const V& r, const V& u) {
  using C = typename V::value_type;
  const V zero(C(0));
  if constexpr (kIntegerReference) {
    return (r * u) < zero;
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<V, Vec>) {
      // One below zero and the other above: min < 0 < max (five instructions). MINPS and MAXPS
      // return their second operand, u, where either is NaN, which is never both < 0 and > 0.
      const __m256 r_ = r, u_ = u, zero_ = zero;
      return Vec(_mm256_and_ps(_mm256_cmp_ps(_mm256_min_ps(r_, u_), zero_, _CMP_LT_OQ),
                               _mm256_cmp_ps(_mm256_max_ps(r_, u_), zero_, _CMP_GT_OQ)));
    }
#endif
    return ((r > zero) & (u < zero)) | ((r < zero) & (u > zero));
  }
}

// The element's new value: `p_new` unless sign(r)*sign(u) < 0 (zeros and NaNs are collaborative),
// then `p`; with `stats`, s = r*u (in the compute type) goes into the statistics of the element's position.
template <bool kIntegerReference, class V>
C10_ALWAYS_INLINE V cnl_select(const V& p, const V& p_new, const V& u, const V& r, bool stats,
                               const BlockStats<V>& acc, int64_t j, int64_t valid) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vec>) {
    // The same operations on AVX-512 mask registers (Vectorized<float> keeps masks in vectors, which
    // costs a conversion per comparison and per blend). A lane left out of a masked add keeps its
    // value, where the generic path adds +0.0: the same result, the sums never being -0.0.
    const __m512 r_ = r, u_ = u, zero = _mm512_setzero_ps();
    const __mmask16 conflict =
        (_mm512_cmp_ps_mask(r_, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(u_, zero, _CMP_LT_OQ)) |
        (_mm512_cmp_ps_mask(r_, zero, _CMP_LT_OQ) & _mm512_cmp_ps_mask(u_, zero, _CMP_GT_OQ));
    if (stats) {
      const int64_t lanes = valid - j * kW;
      const __mmask16 in = lanes >= kW ? __mmask16(0xFFFF) : __mmask16(lanes <= 0 ? 0 : (1u << lanes) - 1u);
      const __mmask16 collaborative = static_cast<__mmask16>(~conflict) & in, conflicting = conflict & in;
      const __m512 s = _mm512_mul_ps(r_, u_);
      acc.count[j] = Vec(_mm512_mask_add_ps(acc.count[j], collaborative, acc.count[j], _mm512_set1_ps(1.0f)));
      acc.collaborative[j] = Vec(_mm512_mask_add_ps(acc.collaborative[j], collaborative, acc.collaborative[j], s));
      acc.conflicting[j] = Vec(_mm512_mask_add_ps(acc.conflicting[j], conflicting, acc.conflicting[j], s));
    }
    return Vec(_mm512_mask_blend_ps(conflict, p_new, p));
  } else
#endif
  {
    using C = typename V::value_type;
    const V zero(C(0));
    const V conflict = conflict_lanes<kIntegerReference>(r, u);
    if (stats) {
      const V in = valid_lanes<V>(j, valid);
      const V s = r * u;
      acc.count[j] = acc.count[j] + (V::blendv(V(C(1)), zero, conflict) & in);
      acc.collaborative[j] = acc.collaborative[j] + (V::blendv(s, zero, conflict) & in);
      acc.conflicting[j] = acc.conflicting[j] + (V::blendv(zero, s, conflict) & in);
    }
    return V::blendv(p_new, p, conflict);
  }
}

// ---------------------------------------------------------------------------- the item loop

// Formats whose values are integers (-1, 0, +1).
constexpr bool is_integer_reference(RefFormat ref) { return ref == RefFormat::kInt8 || ref == RefFormat::kSign2; }

// Bits of a reference per element.
template <RefFormat kRef>
constexpr int reference_bits() {
  switch (kRef) {
    case RefFormat::kFloat32: return 32;
    case RefFormat::kBFloat16: return 16;
    case RefFormat::kInt8: return 8;
    case RefFormat::kSign2: return 2;
    default: return 0;
  }
}

// A step's blocks for run_blocks: Step::block(ptrs, offset, valid, stats) per block, the statistics'
// lanes added into `acc` every kStatGroup blocks (with `acc`: only when the call keeps statistics).
template <class Step>
struct StepBlocks {
  using V = typename Step::V;
  Step step;
  BlockStats<V> stats;
  StatAcc* acc;
  int blocks = 0;

  template <size_t kStreams>
  C10_ALWAYS_INLINE void operator()(void* const (&ptrs)[kStreams], int64_t offset, int64_t, int64_t valid) {
    step.block(ptrs, offset, valid, stats);
    if (acc != nullptr && ++blocks == kStatGroup) {
      acc->flush(stats);
      blocks = 0;
    }
  }
};

// Runs a step over the elements [start, end) of one tensor (run_blocks); adds the item's statistics
// to `partial` when given.
template <class Step, size_t kStreams>
void run_item(const Step& step, void* const (&ptrs)[kStreams], const int (&bits)[kStreams],
              const bool (&written)[kStreams], int64_t start, int64_t end, double* partial) {
  using V = typename Step::V;
  constexpr int64_t kN = kBlock / V::size();
  StatAcc acc;
  V count[kN], collaborative[kN], conflicting[kN];
  const BlockStats<V> block_stats{count, collaborative, conflicting};
  block_stats.clear();
  run_blocks(StepBlocks<Step>{step, block_stats, partial != nullptr ? &acc : nullptr}, ptrs, bits, written, start,
             end);
  if (partial != nullptr) {
    acc.flush(block_stats);
    acc.add_to(partial);
  }
}

// One call: work items of kItemSize elements over all non-empty tensors, one at::parallel_for,
// then per tensor the item statistics summed in item order (and scaled by `stats_scale`).
template <class RunItem>
void for_all_items(const TensorLists& lists, RunItem&& run, double stats_scale = 1.0) {
  const std::vector<WorkItem> items = work_items(lists.count, lists.numels);
  const bool stats = lists.stats != nullptr && lists.ref_format != RefFormat::kNone;
  std::vector<double> partials(stats ? 3 * items.size() : 0, 0.0);
  run_items(items, [&](int64_t k) {
    run(items[k].tensor, items[k].start, items[k].end, stats ? partials.data() + 3 * k : nullptr);
  });
  const int64_t count = static_cast<int64_t>(items.size());
  if (stats) {
    std::vector<double> rows(3 * lists.count, 0.0);
    for (int64_t k = 0; k < count; ++k) {
      double* row = rows.data() + 3 * items[k].tensor;
      for (int c = 0; c < 3; ++c) row[c] += partials[3 * k + c];
    }
    for (int64_t t = 0; t < lists.count; ++t) {
      if (lists.numels[t] == 0) continue;  // the other backends add zeros: same result
      lists.stats[3 * t + 0] += rows[3 * t + 0];
      lists.stats[3 * t + 1] += rows[3 * t + 1] * stats_scale;
      lists.stats[3 * t + 2] += rows[3 * t + 2] * stats_scale;
    }
  }
}

template <class F>
void dispatch(ParamType param, RefFormat ref, F&& f) {
  const auto by_reference = [&](auto type_tag) {
    using T = decltype(type_tag);
    switch (ref) {
      case RefFormat::kNone: return f(T{}, std::integral_constant<RefFormat, RefFormat::kNone>{});
      case RefFormat::kFloat32: return f(T{}, std::integral_constant<RefFormat, RefFormat::kFloat32>{});
      case RefFormat::kBFloat16: return f(T{}, std::integral_constant<RefFormat, RefFormat::kBFloat16>{});
      case RefFormat::kInt8: return f(T{}, std::integral_constant<RefFormat, RefFormat::kInt8>{});
      case RefFormat::kSign2: return f(T{}, std::integral_constant<RefFormat, RefFormat::kSign2>{});
    }
  };
  switch (param) {
    case ParamType::kFloat32: return by_reference(float{});
    case ParamType::kBFloat16: return by_reference(c10::BFloat16{});
    case ParamType::kFloat16: return by_reference(c10::Half{});
    case ParamType::kFloat64: return by_reference(double{});
  }
}

// The variants of a step kernel. kPlain leaves out the options a step rarely has (amsgrad, A-GEM's
// projection, EWC's penalty): their vectors, live only when the option is on, otherwise cost AVX2
// registers on every step (issue 26). kImportance also updates the importance EMAs.
enum class Variant { kPlain, kGeneral, kImportance };

// f(std::integral_constant<Variant, ...>): kImportance with importance, else kPlain where `plain`.
template <class F>
void dispatch_variant(bool importance, bool plain, F&& f) {
  if (importance) {
    f(std::integral_constant<Variant, Variant::kImportance>{});
  } else if (plain) {
    f(std::integral_constant<Variant, Variant::kPlain>{});
  } else {
    f(std::integral_constant<Variant, Variant::kGeneral>{});
  }
}

// ---------------------------------------------------------------------------- importance

// KIF's EMAs of kBlock elements, in the order of operations of cnl_ext/ops/importance.py (each
// operation rounded on its own): `w` the new parameters as stored, `g` the gradients as passed.
C10_ALWAYS_INLINE void update_importance(const ImportanceScalars& imp, float* sensitivity, float* uncertainty,
                                         const Vec (&w)[kVecs], const Vec (&g)[kVecs]) {
  Vec s[kVecs], u[kVecs];
  load_block(sensitivity, s);
  load_block(uncertainty, u);
  const Vec beta1(imp.beta1), one_minus_beta1(imp.one_minus_beta1), beta2(imp.beta2),
      one_minus_beta2(imp.one_minus_beta2), half(0.5f);
  const bool first = imp.kind == ImportanceKind::kFirst;
  for (int64_t j = 0; j < kVecs; ++j) {
    const Vec x = w[j] * g[j];
    const Vec importance = first ? x.abs() : (x - (x * x) * half).abs();
    s[j] = s[j] * beta1 + importance * one_minus_beta1;
    u[j] = u[j] * beta2 + (importance - s[j]).abs() * one_minus_beta2;  // |I - S| of the new S (Eq 11)
  }
  store_block(sensitivity, s);
  store_block(uncertainty, u);
}

// The parameter store of a step with importance (the others store theirs part by part): the block
// `p`, then the EMAs of streams kS and kS + 1 from the stored parameters and the gradients as passed
// `g` (float64 ones rounded to float32, as the float32 EMAs of cnl_ext/ops/importance.py read them).
template <size_t kS, typename T, class V, int64_t kN, size_t kStreams>
C10_ALWAYS_INLINE void store_params_and_importance(T* param, V (&p)[kN], const V (&g)[kN], const Importance* imp,
                                                   void* const (&ptrs)[kStreams], int64_t i) {
  float* sensitivity = static_cast<float*>(ptrs[kS]) + i;
  float* uncertainty = static_cast<float*>(ptrs[kS + 1]) + i;
  if constexpr (std::is_same_v<T, double>) {
    store_block(param, p);
    Vec w[kVecs], g32[kVecs];
    narrow_block(p, w);
    narrow_block(g, g32);
    update_importance(imp->scalars, sensitivity, uncertainty, w, g32);
  } else {
    store_block_as_stored(param, p);
    update_importance(imp->scalars, sensitivity, uncertainty, p, g);
  }
}

// ---------------------------------------------------------------------------- issue 22's terms

// Vectors j and j + 1 of a block of float32 values as vectors of the compute type (float64 steps:
// widened, exactly).
C10_ALWAYS_INLINE void load_float32(const float* p, Vec (&out)[kVecs], int64_t j) { load_part(p, out, j); }

C10_ALWAYS_INLINE void load_float32(const float* p, VecD (&out)[kVecsD], int64_t j) {
  widen(Vec::loadu(p + j * kWD), out[j], out[j + 1]);
}

// A-GEM's projection and EWC's penalty (TensorLists, cnl_ext/ops/rules.py) in the compute type C:
// the scalars rounded once from double, the per-element F and anchor loaded per block.
template <typename T>
struct RuleTerms {
  using C = Compute<T>;
  using V = VecOf<C>;
  static constexpr int64_t kN = kBlock / V::size();
  bool project, ewc;
  C agem_coefficient, two_lambda;

  explicit RuleTerms(const TensorLists& lists)
      : project(lists.project), ewc(lists.fishers != nullptr),
        agem_coefficient(static_cast<C>(lists.agem_coefficient)), two_lambda(static_cast<C>(lists.ewc_two_lambda)) {}

  // Vectors j and j + 1 of F and the anchor of the block at element i (streams `fisher`, `anchor`),
  // when EWC is on.
  C10_ALWAYS_INLINE void load(const void* fisher, const void* anchor, int64_t i, V (&f)[kN], V (&a)[kN],
                              int64_t j) const {
    if (!ewc) return;
    load_float32(static_cast<const float*>(fisher) + i, f, j);
    load_part(static_cast<const T*>(anchor) + i, a, j);
  }

  // g (after maximize's sign) with the terms, in the definition's order: g - c*r, then + 2λ*(F*(p - a)).
  template <bool kMagnitudes>
  C10_ALWAYS_INLINE V apply(V g, const V& p, const V& r, const V& f, const V& a) const {
    if constexpr (kMagnitudes) {
      if (project) g = g - V(agem_coefficient) * r;
    }
    if (ewc) g = g + V(two_lambda) * (f * (p - a));
    return g;
  }
};

// Formats whose values are the reference's magnitudes (A-GEM projects with them).
constexpr bool has_magnitudes(RefFormat ref) { return ref == RefFormat::kFloat32 || ref == RefFormat::kBFloat16; }

// The element's new value: `p_new` where no reference masks (none set, or A-GEM's, which projected the
// gradient instead), else CNL's choice between `p` and `p_new` by the signs of `u` and `r` (cnl_select).
template <RefFormat kRef, bool kRules, typename T, class V>
C10_ALWAYS_INLINE V masked_update(const RuleTerms<T>& rules, const V& p, const V& p_new, const V& u, const V& r,
                                  bool stats, const BlockStats<V>& acc, int64_t j, int64_t valid) {
  if constexpr (kRef == RefFormat::kNone) {
    return p_new;
  } else {
    if (kRules && rules.project) return p_new;
    return cnl_select<is_integer_reference(kRef)>(p, p_new, u, r, stats, acc, j, valid);
  }
}

// ---------------------------------------------------------------------------- SGD

// Streams: param, grad, momentum buffer, reference, sensitivity, uncertainty (the last two with kImportance),
// EWC's F and anchor (with rules.ewc).
template <typename T, RefFormat kRef, Variant kVariant>
struct SgdStep {
  using C = Compute<T>;
  using V = VecOf<C>;
  static constexpr int64_t kN = kBlock / V::size();
  static constexpr bool kImportance = kVariant == Variant::kImportance, kRules = kVariant != Variant::kPlain;
  SgdScalarsT<C> s;  // by value: through a reference, the loop reloads the scalars after every store
  const Importance* importance;
  bool stats;
  RuleTerms<T> rules;

  C10_ALWAYS_INLINE void block(void* const (&ptrs)[8], int64_t i, int64_t valid, const BlockStats<V>& acc) const {
    T* param = static_cast<T*>(ptrs[0]) + i;
    const T* grad = static_cast<const T*>(ptrs[1]) + i;
    C* buf = ptrs[2] == nullptr ? nullptr : static_cast<C*>(ptrs[2]) + i;
    V p[kN], g[kN], b[kN], r[kN], f[kN], a[kN];
    const V lr(s.lr), weight_decay(s.weight_decay), momentum(s.momentum), one_minus_dampening(s.one_minus_dampening);
    CNL_UNROLL_BLOCK
    for (int64_t part = 0; part < kN; part += kPart) {
      load_part(param, p, part);
      load_part(grad, g, part);
      if (s.has_momentum && !s.first_step) load_part(buf, b, part);
      if constexpr (kRef != RefFormat::kNone) load_reference<kRef>(ptrs[3], i, r, part);
      if constexpr (kRules) rules.load(ptrs[6], ptrs[7], i, f, a, part);
      CNL_UNROLL_BLOCK
      for (int64_t j = part; j < part + kPart; ++j) {
        V gj = s.maximize ? g[j].neg() : g[j];
        if constexpr (kRules) gj = rules.template apply<has_magnitudes(kRef)>(gj, p[j], r[j], f[j], a[j]);
        if (s.has_weight_decay) gj = gj + weight_decay * p[j];
        V u = gj;
        if (s.has_momentum) {
          // torch.optim.SGD starts the buffer at the first gradient, undamped.
          b[j] = s.first_step ? gj : momentum * b[j] + one_minus_dampening * gj;
          u = s.nesterov ? gj + momentum * b[j] : b[j];
        }
        p[j] = masked_update<kRef, kRules>(rules, p[j], p[j] - lr * u, u, r[j], stats, acc, j, valid);
      }
      if constexpr (!kImportance) store_part(param, p, part);
      if (s.has_momentum) store_part(buf, b, part);
    }
    if constexpr (kImportance) store_params_and_importance<4>(param, p, g, importance, ptrs, i);
  }
};

// ---------------------------------------------------------------------------- Adam

// Per-tensor scalars that a capturable step takes from its step count.
template <typename C>
struct AdamTensorScalars {
  C step_size, bias_correction2_sqrt;
};

// Streams: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, reference, sensitivity, uncertainty
// (the last two with kImportance), EWC's F and anchor (with rules.ewc).
template <typename T, RefFormat kRef, Variant kVariant>
struct AdamStep {
  using C = Compute<T>;
  using V = VecOf<C>;
  static constexpr int64_t kN = kBlock / V::size();
  static constexpr bool kImportance = kVariant == Variant::kImportance, kRules = kVariant != Variant::kPlain;
  AdamScalarsT<C> s;  // by value: through a reference, the loop reloads the scalars after every store
  AdamTensorScalars<C> t;
  const Importance* importance;
  bool stats;
  RuleTerms<T> rules;

  C10_ALWAYS_INLINE void block(void* const (&ptrs)[10], int64_t i, int64_t valid, const BlockStats<V>& acc) const {
    T* param = static_cast<T*>(ptrs[0]) + i;
    const T* grad = static_cast<const T*>(ptrs[1]) + i;
    C* exp_avg = static_cast<C*>(ptrs[2]) + i;
    C* exp_avg_sq = static_cast<C*>(ptrs[3]) + i;
    const bool amsgrad = kRules && s.amsgrad;
    C* max_exp_avg_sq = amsgrad ? static_cast<C*>(ptrs[4]) + i : nullptr;
    V p[kN], g[kN], m[kN], v[kN], vmax[kN], r[kN], f[kN], a[kN];
    const V beta1(s.beta1), beta2(s.beta2), one_minus_beta1(s.one_minus_beta1),
        one_minus_beta2(s.one_minus_beta2), eps(s.eps), weight_decay(s.weight_decay),
        one_minus_lr_wd(s.one_minus_lr_wd), lr_weight_decay(s.lr_weight_decay), step_size(t.step_size),
        bias_correction2_sqrt(t.bias_correction2_sqrt);
    CNL_UNROLL_BLOCK
    for (int64_t part = 0; part < kN; part += kPart) {
      load_part(param, p, part);
      load_part(grad, g, part);
      load_part(exp_avg, m, part);
      load_part(exp_avg_sq, v, part);
      if (amsgrad) load_part(max_exp_avg_sq, vmax, part);
      if constexpr (kRef != RefFormat::kNone) load_reference<kRef>(ptrs[5], i, r, part);
      if constexpr (kRules) rules.load(ptrs[8], ptrs[9], i, f, a, part);
      CNL_UNROLL_BLOCK
      for (int64_t j = part; j < part + kPart; ++j) {
        V gj = s.maximize ? g[j].neg() : g[j];
        if constexpr (kRules) gj = rules.template apply<has_magnitudes(kRef)>(gj, p[j], r[j], f[j], a[j]);
        if (s.l2_weight_decay) gj = gj + weight_decay * p[j];
        // Moments are updated for every element; the mask touches only the parameter.
        // Operation order of the torch backend (cnl_ext/ops/torch_backend.py): m·β1 + (1−β1)·g, v·β2 + (1−β2)·(g·g).
        m[j] = beta1 * m[j] + one_minus_beta1 * gj;
        v[j] = beta2 * v[j] + one_minus_beta2 * (gj * gj);
        V second = v[j];
        if (amsgrad) second = vmax[j] = at::vec::maximum(vmax[j], v[j]);  // NaN-propagating, as torch.maximum
        // torch.optim's order: step = (step_size·m) / denom, one division per element.
        const V denom = second.sqrt() / bias_correction2_sqrt + eps;
        const V step = step_size * m[j] / denom;
        // The mask and the statistics see lr·u (the sums are scaled by 1/lr once per tensor).
        V lr_u, p_new;
        if (s.decoupled_weight_decay) {
          // AdamW: the decay is part of u (spec), so a frozen element is not decayed either.
          lr_u = step + lr_weight_decay * p[j];
          p_new = p[j] * one_minus_lr_wd - step;  // torch.optim.AdamW's order of operations
        } else {
          lr_u = step;
          p_new = p[j] - step;
        }
        p[j] = masked_update<kRef, kRules>(rules, p[j], p_new, lr_u, r[j], stats, acc, j, valid);
      }
      if constexpr (!kImportance) store_part(param, p, part);
      store_part(exp_avg, m, part);
      store_part(exp_avg_sq, v, part);
      if (amsgrad) store_part(max_exp_avg_sq, vmax, part);
    }
    if constexpr (kImportance) store_params_and_importance<6>(param, p, g, importance, ptrs, i);
  }
};

// ---------------------------------------------------------------------------- masked write-back

// Streams: param (theta after the step), before (theta before), reference.
template <typename T, RefFormat kRef>
struct MaskedDeltaStep {
  using V = VecOf<Compute<T>>;
  static constexpr int64_t kN = kBlock / V::size();
  bool stats;

  C10_ALWAYS_INLINE void block(void* const (&ptrs)[3], int64_t i, int64_t valid, const BlockStats<V>& acc) const {
    T* param = static_cast<T*>(ptrs[0]) + i;
    const T* before = static_cast<const T*>(ptrs[1]) + i;
    V after[kN], b[kN], r[kN];
    CNL_UNROLL_BLOCK
    for (int64_t part = 0; part < kN; part += kPart) {
      load_part(param, after, part);
      load_part(before, b, part);
      load_reference<kRef>(ptrs[2], i, r, part);
      for (int64_t j = part; j < part + kPart; ++j) {
        // u = -delta (its sign is exact in the compute type); the sums of s are scaled by 1/lr once per tensor.
        const V u = b[j] - after[j];
        after[j] = cnl_select<is_integer_reference(kRef)>(b[j], after[j], u, r[j], stats, acc, j, valid);
      }
      store_part(param, after, part);
    }
  }
};

// The steps in compute type C: `dispatch` instantiates every parameter type, and those of another
// compute type (which the bindings never pass with these scalars) do nothing.
template <typename C>
void sgd_step_in(const TensorLists& lists, const SgdScalarsT<C>& scalars, const Importance* importance) {
  SgdScalarsT<C> s = scalars;
  if (s.lr_ptr != nullptr) s.lr = *s.lr_ptr;  // capturable: the learning rate tensor (on the CPU)
  const bool has_ref = lists.ref_format != RefFormat::kNone;
  const bool stats = has_ref && lists.stats != nullptr;
  dispatch(lists.param_type, lists.ref_format, [&](auto type_tag, auto ref_tag) {
    using T = decltype(type_tag);
    if constexpr (std::is_same_v<Compute<T>, C>) {
      const bool ewc = lists.fishers != nullptr;
      dispatch_variant(importance != nullptr, !ewc && !lists.project, [&](auto variant_tag) {
        constexpr RefFormat kRef = decltype(ref_tag)::value;
        using Step = SgdStep<T, kRef, decltype(variant_tag)::value>;
        constexpr bool kImportance = Step::kImportance;
        const Step step{s, importance, stats, RuleTerms<T>(lists)};
        const int bits[8] = {8 * sizeof(T), 8 * sizeof(T), 8 * sizeof(C), reference_bits<kRef>(), 32, 32, 32,
                             8 * sizeof(T)};
        const bool written[8] = {true, false, true, false, true, true, false, false};
        for_all_items(lists, [&](int64_t t, int64_t start, int64_t end, double* partial) {
          void* const ptrs[8] = {lists.params[t], lists.grads[t], s.has_momentum ? lists.states[0][t] : nullptr,
                                 has_ref ? lists.references[t] : nullptr,
                                 kImportance ? importance->sensitivities[t] : nullptr,
                                 kImportance ? importance->uncertainties[t] : nullptr,
                                 ewc ? lists.fishers[t] : nullptr, ewc ? lists.anchors[t] : nullptr};
          run_item(step, ptrs, bits, written, start, end, partial);
        });
      });
    }
  });
}

template <typename C>
void adam_step_in(const TensorLists& lists, const AdamScalarsT<C>& scalars, const Importance* importance) {
  AdamScalarsT<C> s = scalars;
  if (s.lr_ptr != nullptr) {
    // Capturable: lr from its tensor, the derived scalars then in the compute type (the definition,
    // cnl_ext/optim/adam.py).
    s.lr = *s.lr_ptr;
    s.lr_weight_decay = s.lr * s.weight_decay;
    s.one_minus_lr_wd = C(1) - s.lr_weight_decay;
    s.step_size = s.lr / s.bias_correction1;
  }
  std::vector<AdamTensorScalars<C>> per_tensor(lists.count, {s.step_size, s.bias_correction2_sqrt});
  if (lists.steps != nullptr) {
    for (int64_t t = 0; t < lists.count; ++t) {
      // The capturable bias corrections of the definition: pow, 1 - x, sqrt and lr / bc1 in C.
      const C step = static_cast<C>(*static_cast<const float*>(lists.steps[t]));
      const C bias_correction1 = C(1) - std::pow(s.beta1, step);
      per_tensor[t].bias_correction2_sqrt = std::sqrt(C(1) - std::pow(s.beta2, step));
      per_tensor[t].step_size = s.lr / bias_correction1;
    }
  }
  // The statistics of lr·u, scaled by 1/lr once per tensor (0 at lr = 0, where nothing moves).
  const double inv_lr = s.lr == C(0) ? 0.0 : 1.0 / static_cast<double>(s.lr);
  const bool has_ref = lists.ref_format != RefFormat::kNone;
  const bool stats = has_ref && lists.stats != nullptr;
  dispatch(lists.param_type, lists.ref_format, [&](auto type_tag, auto ref_tag) {
    using T = decltype(type_tag);
    if constexpr (std::is_same_v<Compute<T>, C>) {
      const bool ewc = lists.fishers != nullptr;
      dispatch_variant(importance != nullptr, !s.amsgrad && !ewc && !lists.project, [&](auto variant_tag) {
        constexpr RefFormat kRef = decltype(ref_tag)::value;
        using Step = AdamStep<T, kRef, decltype(variant_tag)::value>;
        constexpr bool kImportance = Step::kImportance;
        const int bits[10] = {8 * sizeof(T), 8 * sizeof(T), 8 * sizeof(C), 8 * sizeof(C), 8 * sizeof(C),
                              reference_bits<kRef>(), 32, 32, 32, 8 * sizeof(T)};
        const bool written[10] = {true, false, true, true, true, false, true, true, false, false};
        const RuleTerms<T> rules(lists);
        for_all_items(lists, [&](int64_t t, int64_t start, int64_t end, double* partial) {
          const Step step{s, per_tensor[t], importance, stats, rules};
          void* const ptrs[10] = {lists.params[t],    lists.grads[t],
                                  lists.states[0][t], lists.states[1][t],
                                  s.amsgrad ? lists.states[2][t] : nullptr, has_ref ? lists.references[t] : nullptr,
                                  kImportance ? importance->sensitivities[t] : nullptr,
                                  kImportance ? importance->uncertainties[t] : nullptr,
                                  ewc ? lists.fishers[t] : nullptr, ewc ? lists.anchors[t] : nullptr};
          run_item(step, ptrs, bits, written, start, end, partial);
        }, inv_lr);
      });
    }
  });
}

// ---------------------------------------------------------------------------- A-GEM's reduction

// Σ g·r of one item: products in the compute type, added into lanes of the compute type per block
// position, which go into double every kStatGroup blocks; the positions then summed in order.
template <typename T, RefFormat kRef>
struct DotBlocks {
  using C = Compute<T>;
  using V = VecOf<C>;
  static constexpr int64_t kN = kBlock / V::size();
  V* lanes;
  double* wide;  // kBlock doubles
  int blocks = 0;

  C10_ALWAYS_INLINE void operator()(void* const (&ptrs)[2], int64_t offset, int64_t, int64_t) {
    V g[kN], r[kN];
    for (int64_t part = 0; part < kN; part += kPart) {
      load_part(static_cast<const T*>(ptrs[0]) + offset, g, part);
      load_reference<kRef>(ptrs[1], offset, r, part);
      for (int64_t j = part; j < part + kPart; ++j) lanes[j] = lanes[j] + g[j] * r[j];
    }
    if (++blocks == kStatGroup) flush();
  }

  void flush() {
    alignas(64) C values[kBlock];
    for (int64_t j = 0; j < kN; ++j) {
      lanes[j].store(values + j * V::size());
      lanes[j] = V(C(0));
    }
    for (int64_t k = 0; k < kBlock; ++k) wide[k] += static_cast<double>(values[k]);
    blocks = 0;
  }
};

}  // namespace

const char* capability() { return CNL_STRINGIFY(CPU_CAPABILITY); }

void agem_dot(const TensorLists& lists, double* out) {
  dispatch(lists.param_type, lists.ref_format, [&](auto type_tag, auto ref_tag) {
    using T = decltype(type_tag);
    constexpr RefFormat kRef = decltype(ref_tag)::value;
    if constexpr (kRef != RefFormat::kNone) {
      using Blocks = DotBlocks<T, kRef>;
      const std::vector<WorkItem> items = work_items(lists.count, lists.numels);
      std::vector<double> partials(items.size(), 0.0);
      const int bits[2] = {8 * sizeof(T), reference_bits<kRef>()};
      const bool written[2] = {false, false};
      run_items(items, [&](int64_t k) {
        const WorkItem& item = items[k];
        typename Blocks::V lanes[Blocks::kN];
        for (auto& lane : lanes) lane = typename Blocks::V(typename Blocks::C(0));
        double wide[kBlock] = {};
        void* const ptrs[2] = {lists.grads[item.tensor], lists.references[item.tensor]};
        Blocks blocks = run_blocks(Blocks{lanes, wide}, ptrs, bits, written, item.start, item.end);
        blocks.flush();
        for (int64_t j = 0; j < kBlock; ++j) partials[k] += wide[j];
      });
      for (size_t k = 0; k < items.size(); ++k) out[items[k].tensor] += partials[k];  // item order
    }
  });
}

void sgd_step(const TensorLists& lists, const SgdScalars& scalars, const Importance* importance) {
  sgd_step_in(lists, scalars, importance);
}

void sgd_step(const TensorLists& lists, const SgdScalarsT<double>& scalars, const Importance* importance) {
  sgd_step_in(lists, scalars, importance);
}

void adam_step(const TensorLists& lists, const AdamScalars& scalars, const Importance* importance) {
  adam_step_in(lists, scalars, importance);
}

void adam_step(const TensorLists& lists, const AdamScalarsT<double>& scalars, const Importance* importance) {
  adam_step_in(lists, scalars, importance);
}

void masked_delta(const TensorLists& lists, double inv_lr) {
  const bool stats = lists.stats != nullptr;
  dispatch(lists.param_type, lists.ref_format, [&](auto type_tag, auto ref_tag) {
    using T = decltype(type_tag);
    constexpr RefFormat kRef = decltype(ref_tag)::value;
    if constexpr (kRef != RefFormat::kNone) {
      const MaskedDeltaStep<T, kRef> step{stats};
      const int bits[3] = {8 * sizeof(T), 8 * sizeof(T), reference_bits<kRef>()};
      const bool written[3] = {true, false, false};
      for_all_items(
          lists,
          [&](int64_t t, int64_t start, int64_t end, double* partial) {
            void* const ptrs[3] = {lists.params[t], lists.grads[t], lists.references[t]};
            run_item(step, ptrs, bits, written, start, end, partial);
          },
          inv_lr);
    }
  });
}

}  // namespace cnl::cpu
