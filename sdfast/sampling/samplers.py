"""Samplers in the style of k-diffusion's sampling.py: ``sample_x(model, x, sigmas, ...) -> x``.

``model(x, sigma)`` returns the denoised estimate D(x; sigma) for latents in VE form (see denoiser.py).
Each function is one algorithm and advances x through ``sigmas``; ``callback(i, x)`` is told after every step.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Model = Callable[[np.ndarray, float], np.ndarray]
NoiseSource = Callable[[tuple[int, ...]], np.ndarray]
Callback = Callable[[int, np.ndarray], None] | None


def to_d(x: np.ndarray, sigma: float, denoised: np.ndarray) -> np.ndarray:
    """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / np.float32(sigma)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part to sigma_down and fresh noise of sigma_up (k-diffusion get_ancestral_step)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def sample_euler(model: Model, x: np.ndarray, sigmas: np.ndarray, callback: Callback = None) -> np.ndarray:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, 'Elucidating the Design Space', Alg. 2 with no churn)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        x = x + to_d(x, sigma, denoised) * np.float32(sigma_next - sigma)
        if callback:
            callback(i, x)
    return x


def sample_ddim(
    model: Model,
    x: np.ndarray,
    sigmas: np.ndarray,
    callback: Callback = None,
    *,
    eta: float = 0.0,
    noise: NoiseSource | None = None,
    clip_denoised: float | None = None,
    landing_sigmas: np.ndarray | None = None,
) -> np.ndarray:
    """DDIM (Song et al. 2020, 'Denoising Diffusion Implicit Models', eq. 12) written in VE form.

    With eta = 0 it is Euler on DDIM's sigma grid; with eta > 0 it adds noise of sigma_up as an ancestral step,
    which is algebraically DDIM's sigma_t(eta). ``clip_denoised`` clamps x0 but not the noise estimate, as diffusers' clip_sample.
    ``landing_sigmas[i]``, when given, is where step i lands before x is re-read at sigmas[i + 1] (same VP latents).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if landing_sigmas is not None:
            sigma_next = float(landing_sigmas[i])
        denoised = model(x, sigma)
        epsilon = to_d(x, sigma, denoised)
        if clip_denoised is not None:
            denoised = np.clip(denoised, -clip_denoised, clip_denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + epsilon * np.float32(sigma_down)
        if sigma_up:
            if noise is None:
                raise ValueError("sample_ddim with eta > 0 needs a noise source")
            x = x + noise(x.shape) * np.float32(sigma_up)
        if landing_sigmas is not None and sigma_next != float(sigmas[i + 1]):
            x = x * np.float32(((1.0 + float(sigmas[i + 1]) ** 2) / (1.0 + sigma_next**2)) ** 0.5)
        if callback:
            callback(i, x)
    return x
