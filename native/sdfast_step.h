/* The arithmetic of one sampler update (sdfast_sampler_step), per element, for the CUDA kernel and for the CPU.
 *
 * native/sdfast_kernels.cu runs sdfast_step_element with one thread per element; native/sdfast_host_step.cu runs the
 * same function in a plain loop, compiled by nvcc for the host, so the tests check this code, not a transcription of
 * it, against the numpy samplers (device_loop.fused_step) on a machine without a GPU. C++ (nvcc or a C++ compiler).
 */
#ifndef SDFAST_STEP_H
#define SDFAST_STEP_H

#include "sdfast_kernels.h"

#if defined(__CUDACC__)
#define SDFAST_HOST_DEVICE __host__ __device__
#else
#define SDFAST_HOST_DEVICE
#endif

/* Arguments no launch can use: a missing buffer the update reads or writes (checked on the host, before any work). */
inline bool sdfast_step_args_invalid(const SdfastStepArgs* a) {
  return a == nullptr || a->states[0] == nullptr || a->unet_out == nullptr || a->state_out == nullptr ||
         a->estimate_out == nullptr || (a->write_next && (a->unet_in == nullptr || a->timestep == nullptr)) ||
         a->per_row < 0 || a->rows < 0;
}

/* Element i = row * per_row + e of the latents [B, C, h, w]: the guidance combine, D_j, S_{j+1} and the next U-Net input.
 * It reads index i of every ring buffer before it writes index i, so state_out may alias the oldest state. */
SDFAST_HOST_DEVICE inline void sdfast_step_element(const SdfastStepArgs& a, int64_t i) {
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

/* Row r of the next evaluation's timestep [R], for r < (guided ? 2 : 1) * rows. */
SDFAST_HOST_DEVICE inline void sdfast_step_timestep(const SdfastStepArgs& a, int64_t r) {
  if (a.write_next) a.timestep[r] = a.timestep_next;
}

#endif
