/* The measured FMA ceiling: 12 independent fused multiply-add chains per thread, on the widest vectors the compiler is
   allowed (AVX-512: 16 fp32 lanes; AVX2: 8), so each core's FMA pipes stay full and nothing waits on memory.
   sdfast bench builds it with the machine's C compiler (sdfast/bench/ceilings.py); by hand:
     cc -O3 -march=native -pthread sdfast/bench/fma_peak.c -o fma_peak && ./fma_peak 1 && ./fma_peak 2
   Prints "<threads> threads: <GFLOP/s> GFLOP/s (<instruction set>; <checksum>)" (peak_harness.h). */
#include <immintrin.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define ISA "AVX-512"
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
static float sum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define ISA "AVX2"
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
static float sum(vec v) { float out[8]; _mm256_storeu_ps(out, v); return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7]; }
#else
#error "needs AVX-512F or AVX2 with FMA"
#endif

#define N 400000000L /* FMAs per thread, in 12 chains */
#define CHAINS 12

static void* work(void* arg) {
  vec a[CHAINS];
  for (int i = 0; i < CHAINS; i++) a[i] = SET1((float)i);
  vec b = SET1(1.0000001f), c = SET1(0.9999999f);
  for (long n = 0; n < N / CHAINS; n++) {
    a[0] = FMA(a[0], b, c); a[1] = FMA(a[1], b, c); a[2] = FMA(a[2], b, c); a[3] = FMA(a[3], b, c);
    a[4] = FMA(a[4], b, c); a[5] = FMA(a[5], b, c); a[6] = FMA(a[6], b, c); a[7] = FMA(a[7], b, c);
    a[8] = FMA(a[8], b, c); a[9] = FMA(a[9], b, c); a[10] = FMA(a[10], b, c); a[11] = FMA(a[11], b, c);
  }
  float s = 0.f;
  for (int i = 0; i < CHAINS; i++) s += sum(a[i]);
  *(double*)arg = s;
  return 0;
}

#define OPS_PER_THREAD ((N / CHAINS * CHAINS) * LANES * 2.0) /* a multiply and an add per lane */
#define UNIT "GFLOP/s"
#include "peak_harness.h"
