"""The init image (and mask) of img2img and inpainting: encoded once, then the initial latents and the blends of diffusers' pipelines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdfast.sampling.parametrization import add_noise
from sdfast.sampling.schedules import SamplingPlan

if TYPE_CHECKING:
    from sdfast.runtime.pipeline import Pipeline


@dataclass
class ImageSource:
    """The init image (and mask) of img2img and inpainting, encoded once per request and reused by every batch."""

    mean: np.ndarray  # [1 or B, 4, h, w], scaled latents' posterior mean (B: one image per row)
    std: np.ndarray | None  # [1 or B, 4, h, w]; None: the mean is the latents themselves (from_latents)
    mask: np.ndarray | None  # [1, 1, h, w] latent-resolution mask, 1 = repaint (nearest, as diffusers' interpolate)
    masked_mean: np.ndarray | None  # [1, 4, h, w] posterior of the image with the masked region blanked (9-channel U-Nets)
    masked_std: np.ndarray | None
    rows: int  # the engine's batch: every array below has this many rows
    prediction_type: str  # how the image latents are noised to a sigma (parametrization.add_noise)
    known: np.ndarray | None = None  # [B, 4, h, w] the sampled image latents of the current batch
    noise: np.ndarray | None = None  # [B, 4, h, w] the current batch's initial noise

    @classmethod
    def encode(cls, pipeline: "Pipeline", image: np.ndarray, mask: np.ndarray | None, tiled: bool = False) -> "ImageSource":
        """``image``: [1, 3, H, W] for every row, or [B, 3, H, W], one per image (hires fix's upscaled first pass);
        ``tiled``: through the encoder's tile graph (runtime.tiled_vae)."""
        mean, std = pipeline.encode_image(image, tiled)  # [1 or B, 4, h, w] each
        latent_mask = masked_mean = masked_std = None
        if mask is not None:
            factor = image.shape[-1] // mean.shape[-1]
            latent_mask = mask[:, :, ::factor, ::factor].astype(np.float32)  # torch interpolate 'nearest' at an integer factor
            if pipeline.inpainting_unet:
                masked_mean, masked_std = pipeline.encode_image(image * (mask < 0.5), tiled)
        return cls(mean, std, latent_mask, masked_mean, masked_std, pipeline.batch_size, pipeline.manifest.prediction_type)

    @classmethod
    def from_latents(cls, pipeline: "Pipeline", latents: np.ndarray) -> "ImageSource":
        """img2img from latents [B, 4, h, w] as they are (hires fix's latent upscalers): no VAE, no posterior draw."""
        return cls(latents, None, None, None, None, pipeline.batch_size, pipeline.manifest.prediction_type)

    def blends(self, inpainting_unet: bool) -> bool:
        """Ordinary U-Nets inpaint by blending the known region back after each step; 9-channel ones see the mask."""
        return self.mask is not None and not inpainting_unet

    def initial_latents(self, draw, plan: SamplingPlan, strength: float, inpainting_unet: bool):
        """x [B, C, h, w] in the samplers' form, and the 9-channel conditioning, drawing noise in the img2img and inpaint
        pipelines' order (StableDiffusion's, SDXL's and SD3's draw alike)."""
        def rows(a: np.ndarray) -> np.ndarray:  # the engine's rows: one image for all, or one per image, the first padding
            return np.concatenate([a, np.repeat(a[:1], self.rows - len(a), axis=0)])

        strength_max = strength == 1.0 and self.mask is not None  # the inpaint pipeline starts from pure noise at strength 1
        needs_image = not (inpainting_unet and strength_max)
        if self.std is None:  # given latents: taken as they are
            self.known = rows(self.mean)
        else:
            self.known = rows(self.mean) + rows(self.std) * draw() if needs_image else None  # DiagonalGaussian.sample
        self.noise = draw()
        if strength_max:
            x = self.noise * np.float32(plan.initial_noise_scale)
        else:
            x = add_noise(self.known, self.noise, float(plan.sigmas[0]), self.prediction_type)  # the scheduler's, at the first timestep
        conditioning = None
        if self.mask is not None:
            masked = draw()  # the inpaint pipeline always samples the masked image's posterior (unused by 4-channel U-Nets)
            if inpainting_unet:
                conditioning = np.concatenate([rows(self.mask), rows(self.masked_mean) + rows(self.masked_std) * masked], axis=1)
        return x, conditioning

    def blend_callback(self, plan: SamplingPlan, progress):
        """After step i, the known region is the image noised to sigma i + 1 (diffusers' StableDiffusionInpaintPipeline, 4-channel)."""
        last = plan.steps - 1

        def callback(i: int, x: np.ndarray):
            if progress:
                progress(i, x)
            if i == last:
                return x  # the final blend happens in VP form, after the loop
            return self._blend(x, plan.sigmas[i + 1])

        return callback

    def blending_model(self, denoiser, plan: SamplingPlan):
        """The denoiser, but every evaluation after the first sees x with the known region noised to its sigma.

        After a full step this changes nothing (the callback already blended x there, and blending twice is exact
        with a 0/1 mask). Between the two evaluations of Heun or DPM2 it is diffusers' blend after each scheduler call:
        returning x - x_b + D(x_b) makes the sampler's derivative (x - D) / sigma the blended one.
        """
        evaluations = 0

        def model(x: np.ndarray, sigma: float) -> np.ndarray:
            nonlocal evaluations
            evaluations += 1
            if evaluations == 1:
                return denoiser(x, sigma)  # diffusers does not blend before the first step
            level = np.float32(sigma)
            if plan.midpoint_sigmas is not None and (level == plan.midpoint_sigmas).any():
                # diffusers' KDPM2 add_noise looks the midpoint timestep up in its interleaved sigmas: the next sigma
                level = plan.sigmas[1:][np.flatnonzero(level == plan.midpoint_sigmas)[0]]
            blended = self._blend(x, level)
            return (x - blended) + denoiser(blended, sigma)

        model.prediction_type = denoiser.prediction_type  # PLMS reads it
        return model

    def _blend(self, x: np.ndarray, sigma: float) -> np.ndarray:
        """x with the known region replaced by the image latents noised to ``sigma`` (exact for a 0/1 mask)."""
        return (np.float32(1.0) - self.mask) * add_noise(self.known, self.noise, float(sigma), self.prediction_type) + self.mask * x

    def keep_known(self, x: np.ndarray) -> np.ndarray:
        """The final blend, in VP form: the known region is exactly the image latents."""
        return (np.float32(1.0) - self.mask) * self.known + self.mask * x
