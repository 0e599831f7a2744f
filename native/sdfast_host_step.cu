// sdfast_sampler_step's arithmetic on the CPU: the kernel's own per-element function (sdfast_step.h) in a plain loop.
// nvcc compiles it for the host (it needs no GPU: no kernel is launched), so the tests run the real code:
//   nvcc -O2 -std=c++17 -shared -Xcompiler -fPIC -o libsdfast_host_step.so native/sdfast_host_step.cu
#include "sdfast_step.h"

// The whole update on host memory, element by element as the kernel's threads do it. Returns 1 (cudaErrorInvalidValue,
// as sdfast_sampler_step) for arguments sdfast_step_args_invalid refuses, else 0.
extern "C" SDFAST_API int sdfast_host_sampler_step(const SdfastStepArgs* args) {
  if (sdfast_step_args_invalid(args)) return 1;
  const int64_t total = args->per_row * args->rows;
  for (int64_t i = 0; i < total; ++i) sdfast_step_element(*args, i);
  const int64_t unet_rows = (args->guided ? 2 : 1) * args->rows;
  for (int64_t r = 0; r < unet_rows; ++r) sdfast_step_timestep(*args, r);
  return 0;
}

// sizeof(SdfastStepArgs) as this build sees it: sdfast/runtime/native.py's ctypes mirror must match it.
extern "C" SDFAST_API size_t sdfast_host_step_args_size(void) { return sizeof(SdfastStepArgs); }
