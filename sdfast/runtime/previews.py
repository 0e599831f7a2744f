"""Live previews: a latent's picture without the VAE, as A1111's "Approx cheap" live preview makes it.

A fixed linear map from the latent channels to RGB (Birch-san's latent-to-RGB fit, used by A1111's
sd_vae_approx.cheap_approximation and ComfyUI's latent previews): rgb = latent . coefficients, then (rgb + 1) / 2 as
an image, one pixel per latent cell. Each family's runtime module holds its coefficients (``preview_rgb``).
"""
from __future__ import annotations

import numpy as np


def approx_cheap(latents: np.ndarray, coefficients: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    """latents [C, h, w] (the denoiser's latent space, e.g. an x0 estimate) -> uint8 [h, w, 3]."""
    rgb = np.einsum("chw,cr->hwr", latents.astype(np.float32, copy=False), np.asarray(coefficients, dtype=np.float32))
    return (np.clip((rgb + 1.0) / 2.0, 0.0, 1.0) * 255.0).round().astype(np.uint8)  # rgb: [h, w, 3]
