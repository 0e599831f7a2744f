"""Samplers in the style of k-diffusion's sampling.py: ``sample_x(model, x, sigmas, ...) -> x``.

``model(x, sigma)`` returns the denoised estimate D(x; sigma) for latents in VE form (see denoiser.py).
Each function is one algorithm and advances x through ``sigmas``; ``callback(i, x)`` is told after every step and may
return replacement latents (inpainting blends the kept region back in), or None to keep x.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Model = Callable[[np.ndarray, float], np.ndarray]
NoiseSource = Callable[[tuple[int, ...]], np.ndarray]
Callback = Callable[[int, np.ndarray], np.ndarray | None] | None


def after_step(callback: Callback, i: int, x: np.ndarray) -> np.ndarray:
    """Tell ``callback`` that step i is done; it may return latents that replace x (None keeps x)."""
    if callback is None:
        return x
    replaced = callback(i, x)
    return x if replaced is None else replaced


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
        x = after_step(callback, i, x)
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
        x = after_step(callback, i, x)
    return x


def log_midpoint(sigma_from: float, sigma_to: float) -> float:
    """The midpoint in log sigma, sqrt(sigma_from * sigma_to), rounded to float32 as diffusers' log().lerp(..., 0.5).exp()."""
    return float(np.float32(np.exp((np.log(sigma_from) + np.log(sigma_to)) / 2)))


def sample_euler_ancestral(
    model: Model, x: np.ndarray, sigmas: np.ndarray, callback: Callback = None, *, noise: NoiseSource, eta: float = 1.0
) -> np.ndarray:
    """Euler steps to sigma_down plus fresh noise of sigma_up (ancestral sampling, Ho et al. 2020 / k-diffusion sample_euler_ancestral)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * np.float32(sigma_down - sigma)
        if sigma_up:
            x = x + noise(x.shape) * np.float32(sigma_up)
        x = after_step(callback, i, x)
    return x


def sample_heun(
    model: Model, x: np.ndarray, sigmas: np.ndarray, callback: Callback = None, *, clip_denoised: float | None = None
) -> np.ndarray:
    """Heun's method on the probability-flow ODE (Karras et al. 2022, 'Elucidating the Design Space', Alg. 1); the step to 0 is Euler.

    ``clip_denoised`` clamps each D(x; sigma), as diffusers' clip_sample.
    """
    def derivative(x: np.ndarray, sigma: float) -> np.ndarray:
        denoised = model(x, sigma)
        if clip_denoised is not None:
            denoised = np.clip(denoised, -clip_denoised, clip_denoised)
        return to_d(x, sigma, denoised)

    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = derivative(x, sigma)
        dt = np.float32(sigma_next - sigma)
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            x = x + (d + derivative(x_2, sigma_next)) / np.float32(2) * dt
        x = after_step(callback, i, x)
    return x


def sample_dpm_2(
    model: Model, x: np.ndarray, sigmas: np.ndarray, callback: Callback = None, *, sigmas_mid: np.ndarray | None = None
) -> np.ndarray:
    """Second-order midpoint steps in log sigma, after DPM-Solver-2 (Lu et al. 2022) and Karras et al. 2022, Alg. 2 (k-diffusion sample_dpm_2).

    ``sigmas_mid[i]``, when given, is step i's midpoint (default the log midpoint of sigmas[i] and sigmas[i + 1]).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = to_d(x, sigma, model(x, sigma))
        if sigma_next == 0:
            x = x + d * np.float32(sigma_next - sigma)  # Euler for the last step
        else:
            sigma_mid = log_midpoint(sigma, sigma_next) if sigmas_mid is None else float(sigmas_mid[i])
            x_2 = x + d * np.float32(sigma_mid - sigma)
            x = x + to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * np.float32(sigma_next - sigma)
        x = after_step(callback, i, x)
    return x


def sample_dpm_2_ancestral(
    model: Model,
    x: np.ndarray,
    sigmas: np.ndarray,
    callback: Callback = None,
    *,
    noise: NoiseSource,
    eta: float = 1.0,
    sigmas_mid: np.ndarray | None = None,
) -> np.ndarray:
    """DPM2 midpoint steps to sigma_down plus fresh noise of sigma_up (Lu et al. 2022 / k-diffusion sample_dpm_2_ancestral).

    ``sigmas_mid[i]``, when given, is step i's midpoint (default the log midpoint of sigmas[i] and sigma_down).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = to_d(x, sigma, model(x, sigma))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + d * np.float32(sigma_down - sigma)  # Euler for the last step
        else:
            sigma_mid = log_midpoint(sigma, sigma_down) if sigmas_mid is None else float(sigmas_mid[i])
            x_2 = x + d * np.float32(sigma_mid - sigma)
            x = x + to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * np.float32(sigma_down - sigma)
            x = x + noise(x.shape) * np.float32(sigma_up)
        x = after_step(callback, i, x)
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral over [sigmas[i], sigmas[i + 1]] of the Lagrange basis polynomial j on sigmas[i], ..., sigmas[i - order + 1].

    The basis has degree order - 1, so ``order``-point Gauss-Legendre quadrature is exact (diffusers uses scipy's quad).
    """
    nodes = [float(sigmas[i - k]) for k in range(order)]
    start, end = float(sigmas[i]), float(sigmas[i + 1])
    points, weights = np.polynomial.legendre.leggauss(order)
    tau = (end - start) / 2 * points + (end + start) / 2  # [order] quadrature points in [start, end]
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - nodes[k]) / (nodes[j] - nodes[k])
    return float((end - start) / 2 * np.dot(weights, basis))


def sample_lms(model: Model, x: np.ndarray, sigmas: np.ndarray, callback: Callback = None, *, order: int = 4) -> np.ndarray:
    """Linear multistep (Adams-Bashforth) in sigma over the last ``order`` ODE derivatives (k-diffusion sample_lms, Karras et al. 2022)."""
    derivatives: list[np.ndarray] = []  # newest last, each [B, C, h, w]
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        derivatives = (derivatives + [to_d(x, sigma, model(x, sigma))])[-order:]
        coefficients = [lms_coefficient(sigmas, i, j, len(derivatives)) for j in range(len(derivatives))]
        x = x + sum(np.float32(c) * d for c, d in zip(coefficients, reversed(derivatives)))
        x = after_step(callback, i, x)
    return x


def _adams_bashforth(outputs: list[np.ndarray]) -> np.ndarray:
    """The linear multistep combination of the last one to four outputs, newest last (Liu et al. 2022, eq. 12 and its lower orders)."""
    e = outputs[::-1]  # newest first
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return np.float32(1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


def sample_plms(
    model: Model,
    x: np.ndarray,
    sigmas: np.ndarray,
    callback: Callback = None,
    *,
    predicts_v: bool = False,
    landing_sigmas: np.ndarray | None = None,
    warmup_sigma: float | None = None,
) -> np.ndarray:
    """PLMS (Liu et al. 2022, 'Pseudo Numerical Methods for Diffusion Models on Manifolds', eq. 12), as diffusers' PNDM with skip_prk_steps.

    The first step is a pseudo improved-Euler step, later ones extrapolate the last four network outputs; PNDM's
    transfer is DDIM's, an Euler step in VE form. diffusers extrapolates the network's own output, so v-predicting
    models extrapolate v (``predicts_v``). ``landing_sigmas[i]`` is where step i lands before x is re-read at
    sigmas[i + 1], and the warm-up's second step starts from ``warmup_sigma`` (PNDM's fixed T // steps stride).
    """
    def output(x: np.ndarray, sigma: float) -> np.ndarray:  # the network's epsilon or v at (x, sigma)
        denoised = model(x, sigma)
        eps = to_d(x, sigma, denoised)
        return (eps - denoised * np.float32(sigma)) * np.float32((1 + sigma**2) ** -0.5) if predicts_v else eps

    def step(x: np.ndarray, out: np.ndarray, sigma: float, sigma_to: float) -> np.ndarray:  # PNDM's transfer, in VE form
        if predicts_v:  # epsilon = (v + x sigma / sqrt(1 + sigma^2)) / sqrt(1 + sigma^2), folded in to spare float32 cancellation
            return x * np.float32((1 + sigma * sigma_to) / (1 + sigma**2)) + out * np.float32((sigma_to - sigma) / (1 + sigma**2) ** 0.5)
        return x + out * np.float32(sigma_to - sigma)

    def reread(x: np.ndarray, sigma: float, sigma_as: float) -> np.ndarray:  # the same VP latents, read at sigma_as
        return x if sigma == sigma_as else x * np.float32(((1 + sigma_as**2) / (1 + sigma**2)) ** 0.5)

    lands = sigmas[1:] if landing_sigmas is None else landing_sigmas
    outputs: list[np.ndarray] = []  # the last four network outputs, newest last, each [B, C, h, w]
    for i in range(len(sigmas) - 1):
        sigma, land, sigma_next = float(sigmas[i]), float(lands[i]), float(sigmas[i + 1])
        outputs = (outputs + [output(x, sigma)])[-4:]
        if i == 0 and len(sigmas) > 2:  # warm-up: Euler to sigmas[1], then the step again with the mean of both outputs
            x_2 = reread(step(x, outputs[0], sigma, land), land, sigma_next)
            start = sigma if warmup_sigma is None else warmup_sigma
            x = step(reread(x, sigma, start), (outputs[0] + output(x_2, sigma_next)) / np.float32(2), start, sigma_next)
        else:
            x = reread(step(x, _adams_bashforth(outputs), sigma, land), land, sigma_next)
        x = after_step(callback, i, x)
    return x


def sample_dpmpp_2s_ancestral(
    model: Model, x: np.ndarray, sigmas: np.ndarray, callback: Callback = None, *, noise: NoiseSource, eta: float = 1.0
) -> np.ndarray:
    """DPM-Solver++(2S) (Lu et al. 2022, 'DPM-Solver++', Alg. 1) to sigma_down plus noise of sigma_up (k-diffusion sample_dpmpp_2s_ancestral)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * np.float32(sigma_down - sigma)  # Euler for the last step
        else:
            lam, h = -np.log(sigma), np.log(sigma) - np.log(sigma_down)  # lambda = -log sigma, and the step in it
            sigma_mid = float(np.exp(-(lam + h / 2)))  # DPM-Solver++(2S)'s intermediate point, r = 1/2
            x_2 = np.float32(sigma_mid / sigma) * x - np.float32(np.expm1(-h / 2)) * denoised
            x = np.float32(sigma_down / sigma) * x - np.float32(np.expm1(-h)) * model(x_2, sigma_mid)
        if sigma_next > 0:
            x = x + noise(x.shape) * np.float32(sigma_up)
        x = after_step(callback, i, x)
    return x
