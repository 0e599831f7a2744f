/* The measured FMA ceiling: 12 independent AVX-512 FMA chains per thread.
   gcc -O3 -mavx512f -pthread -include stdlib.h benchmarks/fma_peak.c -o fma_peak && ./fma_peak 1 && ./fma_peak 2 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#include <pthread.h>
#define N 400000000L
static void* work(void* arg) {
  __m512 a0 = _mm512_set1_ps(0.f), a1 = _mm512_set1_ps(1.f), a2 = _mm512_set1_ps(2.f), a3 = _mm512_set1_ps(3.f), a4 = _mm512_set1_ps(4.f), a5 = _mm512_set1_ps(5.f), a6 = _mm512_set1_ps(6.f), a7 = _mm512_set1_ps(7.f), a8 = _mm512_set1_ps(8.f), a9 = _mm512_set1_ps(9.f), a10 = _mm512_set1_ps(10.f), a11 = _mm512_set1_ps(11.f);
  __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(0.9999999f);
  for (long n = 0; n < N / 12; n++) {
    a0 = _mm512_fmadd_ps(a0, b, c);
    a1 = _mm512_fmadd_ps(a1, b, c);
    a2 = _mm512_fmadd_ps(a2, b, c);
    a3 = _mm512_fmadd_ps(a3, b, c);
    a4 = _mm512_fmadd_ps(a4, b, c);
    a5 = _mm512_fmadd_ps(a5, b, c);
    a6 = _mm512_fmadd_ps(a6, b, c);
    a7 = _mm512_fmadd_ps(a7, b, c);
    a8 = _mm512_fmadd_ps(a8, b, c);
    a9 = _mm512_fmadd_ps(a9, b, c);
    a10 = _mm512_fmadd_ps(a10, b, c);
    a11 = _mm512_fmadd_ps(a11, b, c);
  }
  float s = _mm512_reduce_add_ps(a0) + _mm512_reduce_add_ps(a1) + _mm512_reduce_add_ps(a2) + _mm512_reduce_add_ps(a3) + _mm512_reduce_add_ps(a4) + _mm512_reduce_add_ps(a5) + _mm512_reduce_add_ps(a6) + _mm512_reduce_add_ps(a7) + _mm512_reduce_add_ps(a8) + _mm512_reduce_add_ps(a9) + _mm512_reduce_add_ps(a10) + _mm512_reduce_add_ps(a11);
  *(float*)arg = s; return 0;
}
int main(int argc, char** argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1; pthread_t t[8]; float out[8];
  struct timespec s, e; clock_gettime(CLOCK_MONOTONIC, &s);
  for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, work, &out[i]);
  for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
  clock_gettime(CLOCK_MONOTONIC, &e);
  double sec = (e.tv_sec - s.tv_sec) + (e.tv_nsec - s.tv_nsec) * 1e-9;
  printf("%d threads: %.1f GFLOP/s (%.3f)\n", threads, threads * (double)(N / 12 * 12) * 16 * 2 / sec / 1e9, out[0]);
}
