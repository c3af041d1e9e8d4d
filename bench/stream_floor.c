// What the memory system gives a pass by the number of arrays it streams: a copy against plain C
// loops with the access patterns of KIF's fusion passes (bench/importance_fusion.py), so that a
// kernel's ratio to the copy can be split into what its streams cost and what the kernel adds.
//
//   gcc -O3 -march=native -fopenmp bench/stream_floor.c -o /tmp/stream_floor
//   OMP_NUM_THREADS=2 /tmp/stream_floor            # every core of the project's machine
//   OMP_NUM_THREADS=1 /tmp/stream_floor 67257504   # one core; the argument: elements per array
//
// Each pattern runs in place over float32 arrays of the given length (default 134,515,008, the
// SmolLM2-135M parameter count), the patterns interleaved round by round (a shared host's bandwidth
// drifts), median of 7 rounds after 1. Traffic counts the write-allocate read of the copy's
// destination (12 B per element), as bench/harness.py does; the in-place passes read each line they
// write, so their traffic is their bytes.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { kArrays = 7, kRounds = 8 };

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

static int by_value(const void* x, const void* y) {
  const double a = *(const double*)x, b = *(const double*)y;
  return (a > b) - (a < b);
}

int main(int argc, char** argv) {
  const long n = argc > 1 ? atol(argv[1]) : 134515008L;
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
                      {"Recurrent-KIF, authors' rule", recurrent, 36}};
  enum { kPasses = sizeof(passes) / sizeof(passes[0]) };
  double seconds[kPasses][kRounds];
  for (int r = 0; r < kRounds; ++r) {
    for (int v = 0; v < kPasses; ++v) {
      const double start = now();
      passes[v].run(s, n);
      seconds[v][r] = now() - start;
    }
  }
  printf("%ld elements per array, %d threads, median of %d rounds after 1\n\n", n, omp_get_max_threads(),
         kRounds - 1);
  printf("| pass | B / element | ms | GB/s | x copy |\n|---|---|---|---|---|\n");
  double copy_ms = 0.0;
  for (int v = 0; v < kPasses; ++v) {
    qsort(seconds[v] + 1, kRounds - 1, sizeof(double), by_value);
    const double ms = seconds[v][1 + (kRounds - 1) / 2] * 1e3;
    if (v == 0) copy_ms = ms;
    printf("| %s | %d | %.1f | %.1f | %.2f |\n", passes[v].name, passes[v].bytes, ms,
           passes[v].bytes * (double)n / ms / 1e6, ms / (copy_ms * passes[v].bytes / passes[0].bytes));
  }
  return 0;
}
