/* sdfast's on-device sampler loop: the C ABI that sdfast/runtime/native.py loads with ctypes (no torch).
 *
 * One evaluation j of a tabulated sampler (sdfast/sampling/tables.py) is one kernel: the classifier-free guidance
 * combine, the denoiser's scalings, the sampler's linear update over the last four latents and estimates, fresh
 * noise, and the next U-Net input and timestep, written in place so a captured CUDA graph of the U-Net replays as is.
 * Every function returns a cudaError_t (0 = success) and runs on the given stream, asynchronously.
 */
#ifndef SDFAST_KERNELS_H
#define SDFAST_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define SDFAST_API __declspec(dllexport)
#else
#define SDFAST_API __attribute__((visibility("default")))
#endif

#define SDFAST_ABI_VERSION 1
#define SDFAST_HISTORY 4

typedef struct SdfastStepArgs {
  const float* unet_out;  /* [R, C, h, w]: R = 2B with guidance (unconditional rows first), else B */
  float* unet_in;         /* [R, Cin, h, w]: the next evaluation's sample, c_in_next * S_{j+1}, in its first C channels */
  float* timestep;        /* [R]: the next evaluation's timestep */
  const float* states[SDFAST_HISTORY];     /* S_j, S_{j-1}, ... ([B, C, h, w]); NULL where the coefficient is 0 */
  const float* estimates[SDFAST_HISTORY];  /* slot 0 is written (D_j); D_{j-1}, ... are read */
  float* estimate_out;    /* where D_j goes: a free slot (gpu_loop.py passes it as estimates[0] too, which is never read) */
  float* state_out;       /* where S_{j+1} goes (may alias states[SDFAST_HISTORY - 1]: each thread reads before it writes) */
  const float* noise;     /* [B, C, h, w] this update's noise draw, or NULL */
  float state_coeffs[SDFAST_HISTORY];
  float estimate_coeffs[SDFAST_HISTORY];
  float noise_coeff;
  float c_skip, c_out;    /* D_j = c_skip * S_j + c_out * guided U-Net output */
  float c_in_next, timestep_next;
  float cfg_scale;
  int64_t per_row;        /* C * h * w */
  int64_t rows;           /* B */
  int64_t unet_row_stride;/* Cin * h * w */
  int32_t guided;         /* the U-Net batch holds unconditional and conditional rows */
  int32_t use_cfg;        /* combine them (cfg > 1); else take the conditional rows */
  int32_t write_next;     /* 0 on the last evaluation: no next U-Net input */
  int32_t reserved;
} SdfastStepArgs;

SDFAST_API int sdfast_abi_version(void);
SDFAST_API size_t sdfast_step_args_size(void);
SDFAST_API int sdfast_sampler_step(const SdfastStepArgs* args, void* stream);
/* y = x * scale over n floats (the final latents into the VAE's input). */
SDFAST_API int sdfast_scale(const float* x, float* y, float scale, int64_t n, void* stream);
/* [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, rounded half to even as numpy (runtime/images.py to_uint8). */
SDFAST_API int sdfast_to_uint8(const float* image, uint8_t* out, int64_t batch, int64_t height, int64_t width, void* stream);
/* The CUDA runtime's message for an error code. */
SDFAST_API const char* sdfast_error_string(int error);

#ifdef __cplusplus
}
#endif
#endif
