// The CNL AdamW kernels (csrc/cpu/cnl_cpu_kernels.cpp, compiled in) against a copy of torch's fused
// AdamW loop (aten/src/ATen/native/cpu/FusedAdamKernel.cpp), on one thread, on streams of n
// elements: n small (8192: the streams in L2) measures the instruction mix alone (issue 26).
// Prints per case the least ns per element over the rounds and the median ratio to torch's loop.
//
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -std=c++17 -O3 -ffp-contract=off -fopenmp -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 \
//       -DCPU_CAPABILITY_AVX2 -Icsrc -Icsrc/cpu -I$T/include -I$T/include/torch/csrc/api/include \
//       bench/cpu_kernel_microbench.cpp -o /tmp/cpu_kernel_microbench -L$T/lib -ltorch_cpu -lc10 \
//       -Wl,-rpath,$T/lib
//   /tmp/cpu_kernel_microbench 8192 400 25     # elements (a multiple of 8), steps per timing, rounds
#include "cnl_cpu_kernels.cpp"
#include <chrono>
#include <cstdio>
#include <random>
#include <algorithm>
using namespace cnl; using namespace cnl::cpu;
using at::vec::Vectorized;

static void torch_adamw(float* p, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2,
                        float eps, float wd, float bc1, float bc2s) {
  using V = Vectorized<float>;
  const float step_size = lr / bc1;
  int64_t d = 0;
  for (; d < n; d += V::size()) {
    V pv = V::loadu(p + d), gv = V::loadu(g + d);
    pv = pv * V(1 - lr * wd);
    V mv = V::loadu(m + d);
    const V w(1 - b1);
    auto mask = w.abs() < V(0.5);
    auto coeff = V::blendv(w - V(1), w, mask);
    auto base = V::blendv(gv, mv, mask);
    mv = at::vec::fmadd(coeff, gv - mv, base);
    V vv = V::loadu(v + d) * V(b2) + V(1 - b2) * gv * gv;
    mv.store(m + d);
    vv.store(v + d);
    V denom = (vv.sqrt() / V(bc2s)) + V(eps);
    pv = pv + V(-step_size) * mv / denom;
    pv.store(p + d);
  }
}

int main(int argc, char** argv) {
  int64_t n = argc > 1 ? atoll(argv[1]) : 8192;
  int reps = argc > 2 ? atoi(argv[2]) : 1000;
  at::set_num_threads(1);
  std::vector<float> p(n), g(n), m(n), v(n), r(n);
  std::vector<uint8_t> s2((n + 3) / 4);
  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < n; ++i) { p[i] = nd(gen); g[i] = nd(gen); m[i] = 0.01f*nd(gen); v[i] = 0.01f*std::abs(nd(gen)); r[i] = nd(gen); }
  for (auto& b : s2) b = gen() & 0xFF;
  AdamScalars s{};
  s.lr = 1e-7f; s.beta1 = 0.9f; s.beta2 = 0.999f; s.one_minus_beta1 = 0.1f; s.one_minus_beta2 = 0.001f; s.eps = 1e-8f;
  s.weight_decay = 0.01f; s.one_minus_lr_wd = 1 - 1e-9f; s.bias_correction1 = 0.5f; s.bias_correction2_sqrt = 0.7f;
  s.decoupled_weight_decay = true;
  void* pp[1] = {p.data()}; void* gg[1] = {g.data()}; void* mm[1] = {m.data()}; void* vv[1] = {v.data()};
  void* rf[1] = {r.data()}; void* rs[1] = {s2.data()};
  auto time1 = [&](auto&& f) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / reps / n;
  };
  TensorLists L; L.count = 1; L.numels = &n; L.params = pp; L.grads = gg; L.states[0] = mm; L.states[1] = vv;
  const char* names[5] = {"torch_like", "cnl_noref", "cnl_fp32", "cnl_sign2", "cnl_int8"};
  std::vector<int8_t> i8(n);
  for (auto& b : i8) b = int8_t(int(gen() % 3) - 1);
  void* ri[1] = {i8.data()};
  std::vector<double> best(5, 1e9);
  std::vector<std::vector<double>> ratio(5);
  int rounds = argc > 3 ? atoi(argv[3]) : 15;
  for (int round = 0; round < rounds; ++round) {
    double t[5];
    t[0] = time1([&] { torch_adamw(p.data(), g.data(), m.data(), v.data(), n, 1e-7f, 0.9f, 0.999f, 1e-8f, 0.01f, 0.5f, 0.7f); });
    L.ref_format = RefFormat::kNone; L.references = nullptr;
    t[1] = time1([&] { adam_step(L, s); });
    L.ref_format = RefFormat::kFloat32; L.references = rf;
    t[2] = time1([&] { adam_step(L, s); });
    L.ref_format = RefFormat::kSign2; L.references = rs;
    t[3] = time1([&] { adam_step(L, s); });
    L.ref_format = RefFormat::kInt8; L.references = ri;
    t[4] = time1([&] { adam_step(L, s); });
    for (int k = 0; k < 5; ++k) { best[k] = std::min(best[k], t[k]); ratio[k].push_back(t[k] / t[0]); }
  }
  for (int k = 0; k < 5; ++k) {
    std::sort(ratio[k].begin(), ratio[k].end());
    printf("%-11s min %.3f ns/elem, x torch_like: median %.3f\n", names[k], best[k], ratio[k][ratio[k].size() / 2]);
  }
  return 0;
}
