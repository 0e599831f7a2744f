/* The measured int8 ceiling: 12 independent chains per thread of the u8 x s8 dot-product instruction that int8 GEMMs
   (onnxruntime's MLAS QGemm and QLinearConv) are built on: AVX-512 VNNI's vpdpbusd (64 products a zmm), else
   AVX-VNNI's (32 a ymm). Nothing waits on memory. A CPU without VNNI is not measured (the program does not build).
   Intel AMX's int8 tiles are not measured either: on a CPU with AMX, onnxruntime's int8 GEMM may exceed this ceiling.
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
static long long sum(vec v) { return _mm512_reduce_add_epi32(v); }
/* in assembly: from the intrinsic, GCC 12 copied every accumulator twice per instruction (24 moves per 12) */
#define DOT12(a, x, y)                                                                                                  \
  __asm__("vpdpbusd %[y], %[x], %[a0]\n\tvpdpbusd %[y], %[x], %[a1]\n\tvpdpbusd %[y], %[x], %[a2]\n\t"                   \
          "vpdpbusd %[y], %[x], %[a3]\n\tvpdpbusd %[y], %[x], %[a4]\n\tvpdpbusd %[y], %[x], %[a5]\n\t"                   \
          "vpdpbusd %[y], %[x], %[a6]\n\tvpdpbusd %[y], %[x], %[a7]\n\tvpdpbusd %[y], %[x], %[a8]\n\t"                   \
          "vpdpbusd %[y], %[x], %[a9]\n\tvpdpbusd %[y], %[x], %[a10]\n\tvpdpbusd %[y], %[x], %[a11]"                       \
          : [a0] "+v"(a[0]), [a1] "+v"(a[1]), [a2] "+v"(a[2]), [a3] "+v"(a[3]), [a4] "+v"(a[4]), [a5] "+v"(a[5]),       \
            [a6] "+v"(a[6]), [a7] "+v"(a[7]), [a8] "+v"(a[8]), [a9] "+v"(a[9]), [a10] "+v"(a[10]), [a11] "+v"(a[11])    \
          : [x] "v"(x), [y] "v"(y))
#elif defined(__AVXVNNI__)
typedef __m256i vec;
#define ISA "AVX-VNNI"
#define PRODUCTS 32
#define SET1 _mm256_set1_epi32
static long long sum(vec v) { int out[8]; _mm256_storeu_si256((__m256i*)out, v); long long s = 0; for (int i = 0; i < 8; i++) s += out[i]; return s; }
#define DOT12(a, x, y) for (int i = 0; i < 12; i++) a[i] = _mm256_dpbusd_avx_epi32(a[i], x, y)
#else
#error "needs AVX-512 VNNI or AVX-VNNI"
#endif

#define N 400000000L /* dot-product instructions per thread, in 12 chains */
#define CHAINS 12

static void* work(void* arg) {
  vec a[CHAINS];
  for (int i = 0; i < CHAINS; i++) a[i] = SET1(i);
  vec x = SET1(0x01020304), y = SET1(0x01ff01ff);
  for (long n = 0; n < N / CHAINS; n++) {
    DOT12(a, x, y);
  }
  long long s = 0;
  for (int i = 0; i < CHAINS; i++) s += sum(a[i]);
  *(double*)arg = (double)s;
  return 0;
}

#define OPS_PER_THREAD ((N / CHAINS * CHAINS) * PRODUCTS * 2.0) /* a multiply and an add per product */
#define UNIT "GOP/s"
#include "peak_harness.h"
