// The kernels behind sdfast_kernels.h. Elementwise and memory-bound: one thread per latent element.
#include "sdfast_kernels.h"

#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;

__global__ void sampler_step_kernel(SdfastStepArgs a) {
  const int64_t total = a.per_row * a.rows;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / a.per_row;
    const int64_t e = i - row * a.per_row;
    float guided;
    if (a.guided) {
      const float uncond = a.unet_out[row * a.per_row + e];
      const float cond = a.unet_out[(a.rows + row) * a.per_row + e];
      guided = a.use_cfg ? uncond + a.cfg_scale * (cond - uncond) : cond;
    } else {
      guided = a.unet_out[i];
    }
    const float denoised = a.c_skip * a.states[0][i] + a.c_out * guided;
    // S_{j+1} in the order of tables.update: k = 0, 1, ...; states before estimates at each k
    float next = 0.0f;
#pragma unroll
    for (int k = 0; k < SDFAST_HISTORY; ++k) {
      if (a.state_coeffs[k] != 0.0f) next += a.state_coeffs[k] * a.states[k][i];
      if (a.estimate_coeffs[k] != 0.0f) next += a.estimate_coeffs[k] * (k == 0 ? denoised : a.estimates[k][i]);
    }
    if (a.noise != nullptr) next += a.noise_coeff * a.noise[i];
    a.estimate_out[i] = denoised;
    a.state_out[i] = next;
    if (a.write_next) {
      const float sample = a.c_in_next * next;
      a.unet_in[row * a.unet_row_stride + e] = sample;
      if (a.guided) a.unet_in[(a.rows + row) * a.unet_row_stride + e] = sample;
    }
  }
  if (a.write_next && blockIdx.x == 0 && threadIdx.x < (a.guided ? 2 : 1) * a.rows) {
    a.timestep[threadIdx.x] = a.timestep_next;
  }
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
  if (args == nullptr || args->states[0] == nullptr || args->unet_out == nullptr || args->state_out == nullptr ||
      args->estimate_out == nullptr || (args->write_next && (args->unet_in == nullptr || args->timestep == nullptr)) ||
      (args->guided ? 2 : 1) * args->rows > kThreads) {
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
