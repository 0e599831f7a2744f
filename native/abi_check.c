/* Compiled by CMake against the library: the header is valid C, and every symbol links. Prints the struct size that
 * sdfast/runtime/native.py's ctypes mirror must match; it runs without a GPU (no kernel is launched). */
#include <stdio.h>

#include "sdfast_kernels.h"

int main(void) {
  int (*const functions[])(void) = {sdfast_abi_version};
  const void* linked[] = {(const void*)sdfast_sampler_step, (const void*)sdfast_scale, (const void*)sdfast_to_uint8,
                          (const void*)sdfast_error_string};
  printf("abi %d, SdfastStepArgs %zu bytes (library says %zu), %zu symbols linked\n", functions[0](),
         sizeof(SdfastStepArgs), sdfast_step_args_size(), sizeof(linked) / sizeof(linked[0]));
  return sizeof(SdfastStepArgs) == sdfast_step_args_size() && functions[0]() == SDFAST_ABI_VERSION ? 0 : 1;
}
