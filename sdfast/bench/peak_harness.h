/* The harness of fma_peak.c and int8_peak.c: runs the kernel's work() on N threads at once and prints the rate.
   The kernel file defines, before including this: work (a pthread start routine that stores its checksum as a double
   through its argument), OPS_PER_THREAD (the operations one work() call does), UNIT ("GFLOP/s" or "GOP/s") and
   ISA (the instruction set it was built for). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char** argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (threads < 1 || threads > 256) return 2;
  pthread_t t[256];
  double out[256];
  struct timespec s, e;
  clock_gettime(CLOCK_MONOTONIC, &s);
  for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, work, &out[i]);
  for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
  clock_gettime(CLOCK_MONOTONIC, &e);
  double sec = (e.tv_sec - s.tv_sec) + (e.tv_nsec - s.tv_nsec) * 1e-9;
  printf("%d threads: %.1f %s (%s; %.3f)\n", threads, threads * (double)(OPS_PER_THREAD) / sec / 1e9, UNIT, ISA, out[0]);
  return 0;
}
