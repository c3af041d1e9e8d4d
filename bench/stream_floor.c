// What the memory system gives a pass by the number of arrays it streams: a copy against plain C
// loops with the access patterns of KIF's fusion passes (bench/importance_fusion.py) and of the
// optimizer steps with and without a reference (bench/optimizer_step.py, A-GEM's reduction), so that a
// kernel's ratio to the copy (or to torch's step) can be split into what its streams cost and what the
// kernel adds.
//
//   gcc -O3 -march=native -fno-math-errno -fopenmp bench/stream_floor.c -o /tmp/stream_floor -lm
//   OMP_NUM_THREADS=2 /tmp/stream_floor            # every core of the project's machine
//   OMP_NUM_THREADS=1 /tmp/stream_floor 67257504   # one core; the argument: elements per array
//   OMP_NUM_THREADS=2 /tmp/stream_floor 134515008 31   # and the rounds timed (default 7)
//
// Each pattern runs in place over float32 arrays of the given length (default 134,515,008, the
// SmolLM2-135M parameter count), the patterns interleaved round by round (a shared host's bandwidth
// drifts), median of 7 rounds (or as many as given) after 1. Traffic counts the write-allocate read of the copy's
// destination (12 B per element), as bench/harness.py does; the in-place passes read each line they
// write, so their traffic is their bytes.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { kArrays = 7, kMaxRounds = 65 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// copy: b <- a (1 in, 1 out: 12 B with the write-allocate read)
static void copy(float* restrict const* s, long n) {
  float* restrict b = s[1];
  const float* restrict a = s[0];
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) b[i] = a[i];
}

// KIF's task vector: θ <- a + c (θ − a), in place (2 in, 1 out: 12 B)
static void task_vector(float* restrict const* s, long n) {
  float* restrict p = s[0];
  const float* restrict a = s[1];
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) p[i] = (p[i] - a[i]) * 0.5f + a[i];
}

// Recurrent-KIF's streams with the least arithmetic: 7 in, θ and θ_b out (36 B)
static void nine_streams(float* restrict const* s, long n) {
  float* restrict p = s[0];
  float* restrict b = s[1];
  const float *restrict q = s[2], *restrict si = s[3], *restrict ui = s[4], *restrict so = s[5], *restrict uo = s[6];
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) {
    const float r = (q[i] - b[i]) * (si[i] * ui[i] + so[i] * uo[i]) + (p[i] - q[i]);
    p[i] = r;
    b[i] = r;
  }
}

// Recurrent-KIF's fusion with the authors' weights, as the native kernel computes it (36 B)
static void recurrent(float* restrict const* s, long n) {
  float* restrict p = s[0];
  float* restrict b = s[1];
  const float *restrict q = s[2], *restrict si = s[3], *restrict ui = s[4], *restrict so = s[5], *restrict uo = s[6];
  const float delta = 2.5e-13f;
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) {
    const int in = si[i] * ui[i] > delta, out = so[i] * uo[i] > delta;
    const float w_in = in ? (out ? 0.4f : 1.0f) : (out ? 0.0f : 0.5f);
    const float w_out = in ? (out ? 0.6f : 0.0f) : (out ? 1.0f : 0.5f);
    const float r = (p[i] - q[i]) * w_out + ((q[i] - b[i]) * w_in + b[i]);
    p[i] = r;
    b[i] = r;
  }
}

// SGD with momentum as torch's fused step computes it: b <- 0.9 b + g, θ <- θ − lr b (3 in, 2 out: 20 B)
static void momentum(float* restrict const* s, long n) {
  float* restrict p = s[0];
  float* restrict b = s[1];
  const float* restrict g = s[2];
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) {
    b[i] = 0.9f * b[i] + g[i];
    p[i] = p[i] - 1e-3f * b[i];
  }
}

// The same with CNL's mask on a float32 reference r: θ kept where sign(r) sign(b) < 0 (4 in, 2 out: 24 B)
static void momentum_reference(float* restrict const* s, long n) {
  float* restrict p = s[0];
  float* restrict b = s[1];
  const float *restrict g = s[2], *restrict r = s[3];
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) {
    const float u = 0.9f * b[i] + g[i];
    // min < 0 < max, as the native kernels test it (a branch-free form GCC vectorizes)
    const float ri = r[i], lo = ri < u ? ri : u, hi = ri < u ? u : ri;
    const float theta = p[i], updated = theta - 1e-3f * u;
    b[i] = u;
    p[i] = (lo < 0.0f && hi > 0.0f) ? theta : updated;
  }
}

// AdamW as torch's fused step computes it (4 in, 3 out: 28 B)
static void adamw(float* restrict const* s, long n) {
  float *restrict p = s[0], *restrict m = s[1], *restrict v = s[4];
  const float* restrict g = s[2];
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) {
    m[i] = 0.9f * m[i] + 0.1f * g[i];
    v[i] = 0.999f * v[i] + 0.001f * (g[i] * g[i]);
    p[i] = p[i] * 0.99999f - 1e-3f * m[i] / (sqrtf(v[i]) / 0.03f + 1e-8f);
  }
}

// The same with CNL's mask on a float32 reference r (5 in, 3 out: 32 B)
static void adamw_reference(float* restrict const* s, long n) {
  float *restrict p = s[0], *restrict m = s[1], *restrict v = s[4];
  const float *restrict g = s[2], *restrict r = s[3];
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) {
    m[i] = 0.9f * m[i] + 0.1f * g[i];
    v[i] = 0.999f * v[i] + 0.001f * (g[i] * g[i]);
    const float step = 1e-3f * m[i] / (sqrtf(v[i]) / 0.03f + 1e-8f);
    const float u = step + 1e-5f * p[i];
    // min < 0 < max, as the native kernels test it (a branch-free form GCC vectorizes)
    const float ri = r[i], lo = ri < u ? ri : u, hi = ri < u ? u : ri;
    const float theta = p[i], updated = theta * 0.99999f - step;
    p[i] = (lo < 0.0f && hi > 0.0f) ? theta : updated;
  }
}

// A-GEM's reduction g·r, read only (2 in: 8 B)
static volatile float dot_sink;
static void dot(float* restrict const* s, long n) {
  const float *restrict g = s[2], *restrict r = s[3];
  float acc = 0.0f;
#pragma omp parallel for simd schedule(static) reduction(+ : acc)
  for (long i = 0; i < n; ++i) acc += g[i] * r[i];
  dot_sink = acc;
}

static int by_value(const void* x, const void* y) {
  const double a = *(const double*)x, b = *(const double*)y;
  return (a > b) - (a < b);
}

int main(int argc, char** argv) {
  const long n = argc > 1 ? atol(argv[1]) : 134515008L;
  const int rounds = argc > 2 ? atoi(argv[2]) + 1 : 8;
  if (n <= 0 || rounds < 2 || rounds > kMaxRounds) {
    fprintf(stderr, "usage: stream_floor [elements per array] [rounds, 1 to %d]\n", kMaxRounds - 1);
    return 1;
  }
  float* s[kArrays];
  for (int k = 0; k < kArrays; ++k) {
    s[k] = aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
    if (s[k] == NULL) {
      fprintf(stderr, "stream_floor: out of memory\n");
      return 1;
    }
#pragma omp parallel for schedule(static)  // first touch by the threads that stream it
    for (long i = 0; i < n; ++i) s[k][i] = (float)(i % 1000) * 1e-6f;
  }
  struct {
    const char* name;
    void (*run)(float* restrict const*, long);
    int bytes;
  } const passes[] = {{"copy", copy, 12},
                      {"task vector (2 in, 1 out)", task_vector, 12},
                      {"nine streams (7 in, 2 out)", nine_streams, 36},
                      {"Recurrent-KIF, authors' rule", recurrent, 36},
                      {"SGD momentum (3 in, 2 out)", momentum, 20},
                      {"SGD momentum, fp32 reference (4 in, 2 out)", momentum_reference, 24},
                      {"AdamW (4 in, 3 out)", adamw, 28},
                      {"AdamW, fp32 reference (5 in, 3 out)", adamw_reference, 32},
                      {"dot product (2 in, 0 out)", dot, 8}};
  enum { kPasses = sizeof(passes) / sizeof(passes[0]) };
  double seconds[kPasses][kMaxRounds];
  for (int r = 0; r < rounds; ++r) {
    for (int v = 0; v < kPasses; ++v) {
      const double start = now();
      passes[v].run(s, n);
      seconds[v][r] = now() - start;
    }
  }
  // Each reference pattern against the same pattern without it, round by round (the pair ran back to
  // back, so a slow spell of the host slows both): the median of the rounds' ratios.
  static const int pairs[][2] = {{5, 4}, {7, 6}};
  double pair_ratio[2][kMaxRounds - 1];
  for (int k = 0; k < 2; ++k) {
    for (int r = 1; r < rounds; ++r) pair_ratio[k][r - 1] = seconds[pairs[k][0]][r] / seconds[pairs[k][1]][r];
    qsort(pair_ratio[k], rounds - 1, sizeof(double), by_value);
  }
  printf("%ld elements per array, %d threads, median of %d rounds after 1\n\n", n, omp_get_max_threads(),
         rounds - 1);
  printf("| pass | B / element | ms | GB/s | x copy |\n|---|---|---|---|---|\n");
  double copy_ms = 0.0;
  for (int v = 0; v < kPasses; ++v) {
    qsort(seconds[v] + 1, rounds - 1, sizeof(double), by_value);
    const double ms = seconds[v][1 + (rounds - 1) / 2] * 1e3;
    if (v == 0) copy_ms = ms;
    printf("| %s | %d | %.1f | %.1f | %.2f |\n", passes[v].name, passes[v].bytes, ms,
           passes[v].bytes * (double)n / ms / 1e6, ms / (copy_ms * passes[v].bytes / passes[0].bytes));
  }
  printf("\n| with a fp32 reference / without, per round | bytes | median | range |\n|---|---|---|---|\n");
  for (int k = 0; k < 2; ++k) {
    printf("| %s | %.2f | %.2f | %.2f-%.2f |\n", passes[pairs[k][0]].name,
           (double)passes[pairs[k][0]].bytes / passes[pairs[k][1]].bytes, pair_ratio[k][(rounds - 1) / 2],
           pair_ratio[k][0], pair_ratio[k][rounds - 2]);
  }
  return 0;
}
