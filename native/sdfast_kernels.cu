// The kernels behind sdfast_kernels.h. Elementwise and memory-bound: one thread per latent element.
#include "sdfast_kernels.h"
#include "sdfast_step.h"

#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;

__global__ void sampler_step_kernel(SdfastStepArgs a) {
  const int64_t total = a.per_row * a.rows;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sdfast_step_element(a, i);
  }
  if (blockIdx.x == 0 && threadIdx.x < (a.guided ? 2 : 1) * a.rows) sdfast_step_timestep(a, threadIdx.x);
}

__global__ void scale_kernel(const float* x, float* y, float scale, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = x[i] * scale;
  }
}

__global__ void to_uint8_kernel(const float* image, uint8_t* out, int64_t batch, int64_t height, int64_t width) {
  const int64_t plane = height * width;
  const int64_t total = batch * plane * 3;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t channel = o % 3;
    const int64_t pixel = (o / 3) % plane;
    const int64_t b = o / (3 * plane);
    float v = image[(b * 3 + channel) * plane + pixel] / 2.0f + 0.5f;
    v = fminf(fmaxf(v, 0.0f), 1.0f);
    out[o] = static_cast<uint8_t>(rintf(v * 255.0f));  // rintf rounds half to even, as np.round
  }
}

int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

extern "C" {

int sdfast_abi_version(void) { return SDFAST_ABI_VERSION; }

size_t sdfast_step_args_size(void) { return sizeof(SdfastStepArgs); }

int sdfast_sampler_step(const SdfastStepArgs* args, void* stream) {
  // block 0 writes the timesteps, one thread per U-Net row
  if (sdfast_step_args_invalid(args) || (args->guided ? 2 : 1) * args->rows > kThreads) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  sampler_step_kernel<<<blocks_for(args->per_row * args->rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(*args);
  return static_cast<int>(cudaGetLastError());
}

int sdfast_scale(const float* x, float* y, float scale, int64_t n, void* stream) {
  scale_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, y, scale, n);
  return static_cast<int>(cudaGetLastError());
}

int sdfast_to_uint8(const float* image, uint8_t* out, int64_t batch, int64_t height, int64_t width, void* stream) {
  to_uint8_kernel<<<blocks_for(batch * height * width * 3), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      image, out, batch, height, width);
  return static_cast<int>(cudaGetLastError());
}

const char* sdfast_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // extern "C"
