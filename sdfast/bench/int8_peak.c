/* The measured int8 ceiling: 12 independent chains per thread of the u8 x s8 dot-product instruction that int8 GEMMs
   (onnxruntime's MLAS QGemm and QLinearConv) are built on: AVX-512 VNNI's vpdpbusd (64 products a zmm), else AVX-VNNI's
   (32 a ymm), else AVX2's vpmaddubsw + vpmaddwd + vpaddd pair (32 a ymm, three instructions). Nothing waits on memory.
   Intel AMX's int8 tiles are not measured: on a CPU with AMX, onnxruntime's int8 GEMM may exceed this ceiling.
   sdfast bench builds it with the machine's C compiler (sdfast/bench/ceilings.py); by hand:
     cc -O3 -march=native -pthread sdfast/bench/int8_peak.c -o int8_peak && ./int8_peak 1 && ./int8_peak 2
   Prints "<threads> threads: <GOP/s> GOP/s (<instruction set>; <checksum>)" (peak_harness.h), one multiply and one add
   per u8 x s8 product. */
#include <immintrin.h>

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
typedef __m512i vec;
#define ISA "AVX-512 VNNI"
#define PRODUCTS 64 /* per instruction: 16 int32 lanes x 4 u8 x s8 products */
#define SET1 _mm512_set1_epi32
#define DOT(acc, a, b) _mm512_dpbusd_epi32(acc, a, b)
static int sum(vec v) { return _mm512_reduce_add_epi32(v); }
#elif defined(__AVXVNNI__)
typedef __m256i vec;
#define ISA "AVX-VNNI"
#define PRODUCTS 32
#define SET1 _mm256_set1_epi32
#define DOT(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
static int sum(vec v) { int out[8]; _mm256_storeu_si256((__m256i*)out, v); return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7]; }
#elif defined(__AVX2__)
typedef __m256i vec;
#define ISA "AVX2, no VNNI"
#define PRODUCTS 32
#define SET1 _mm256_set1_epi32
/* u8 x s8 pairs summed to int16 (saturating), pairs of those to int32, then accumulated: what MLAS does without VNNI */
#define DOT(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)))
static int sum(vec v) { int out[8]; _mm256_storeu_si256((__m256i*)out, v); return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7]; }
#else
#error "needs AVX-512 VNNI, AVX-VNNI or AVX2"
#endif

#define N 400000000L /* dot-product instructions per thread, in 12 chains */
#define CHAINS 12

static void* work(void* arg) {
  vec acc[CHAINS];
  for (int i = 0; i < CHAINS; i++) acc[i] = SET1(i);
  vec a = SET1(0x01020304), b = SET1(0x01ff01ff);
  for (long n = 0; n < N / CHAINS; n++) {
    acc[0] = DOT(acc[0], a, b); acc[1] = DOT(acc[1], a, b); acc[2] = DOT(acc[2], a, b); acc[3] = DOT(acc[3], a, b);
    acc[4] = DOT(acc[4], a, b); acc[5] = DOT(acc[5], a, b); acc[6] = DOT(acc[6], a, b); acc[7] = DOT(acc[7], a, b);
    acc[8] = DOT(acc[8], a, b); acc[9] = DOT(acc[9], a, b); acc[10] = DOT(acc[10], a, b); acc[11] = DOT(acc[11], a, b);
  }
  int s = 0;
  for (int i = 0; i < CHAINS; i++) s += sum(acc[i]);
  *(double*)arg = s;
  return 0;
}

#define OPS_PER_THREAD ((N / CHAINS * CHAINS) * PRODUCTS * 2.0) /* a multiply and an add per product */
#define UNIT "GOP/s"
#include "peak_harness.h"
