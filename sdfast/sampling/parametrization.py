"""The model's parametrization, in one place: what the network predicts, the denoiser's scalings, and sigma -> timestep.

Every sampler works in k-diffusion's VE form, x = x0 + sigma * eps, on a denoiser D(x; sigma). A VP-trained network
(SD 1.x, SD 2.x, SDXL: DDPM, Ho et al. 2020) sees c_in * x at a training timestep and predicts epsilon or v
(Salimans & Ho 2022); D(x; sigma) = c_skip * x + c_out * F(c_in * x, t(sigma)), with the scalings of Karras et al. 2022,
Table 1. The denoiser (denoiser.py), the coefficient tables of the device loop (tables.py) and the sigma/timestep plans
(schedules.py, solver_plans.py) all take them from here. A flow-matching network (SD3; Lipman et al. 2023) predicts
v = noise - x0 on x_t = (1 - t) x0 + t noise; its samplers keep that form with sigma = t (flow.py), where
D(x; t) = x - t v.
"""
from __future__ import annotations

import numpy as np

from sdfast.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_prediction")
_NOT_YET = {"sample": "x0-predicting models are not supported yet"}


def check_prediction_type(prediction_type: str) -> str:
    """The prediction type, or a ConfigError naming it and the supported ones."""
    if prediction_type not in PREDICTION_TYPES:
        why = _NOT_YET.get(prediction_type, "unknown")
        raise ConfigError(f"prediction type '{prediction_type}' is not supported ({why}; sdfast runs {', '.join(PREDICTION_TYPES)})")
    return prediction_type


def denoiser_scalings(sigmas, prediction_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c_in, c_skip, c_out) in float64 for sigma (a scalar or an array): VP models in VE form (Karras et al. 2022, Table 1),
    flow models in their own form.

    epsilon: c_in = 1/sqrt(sigma^2+1), c_skip = 1, c_out = -sigma; v: c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1);
    flow (sigma = t): c_in = 1, c_skip = 1, c_out = -t.
    """
    check_prediction_type(prediction_type)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if prediction_type == "flow_prediction":
        return np.ones_like(sigmas), np.ones_like(sigmas), -sigmas
    norm = np.sqrt(sigmas * sigmas + 1.0)
    if prediction_type == "epsilon":
        return 1.0 / norm, np.ones_like(sigmas), -sigmas
    return 1.0 / norm, 1.0 / (sigmas * sigmas + 1.0), -sigmas / norm


def sigmas_to_timesteps(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' _sigma_to_t: fractional timesteps interpolating log sigma against the float32 log training sigmas [T]."""
    log_sigmas = np.log(train_sigmas)  # [T] float32
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # [n]
    low = np.cumsum(log_sigma - log_sigmas[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    weight = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def sigma_to_timestep(sigma: float, train_sigmas: np.ndarray) -> float:
    """One fractional timestep whose log sigma interpolates to ``sigma`` in float64 (k-diffusion external.py sigma_to_t)."""
    log_sigmas = np.log(train_sigmas.astype(np.float64))
    log_sigma = np.log(max(float(sigma), 1e-10))
    high = int(np.clip(np.searchsorted(log_sigmas, log_sigma, side="right"), 1, len(log_sigmas) - 1))
    low = high - 1
    weight = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0.0, 1.0)
    return float((1 - weight) * low + weight * high)


def add_noise(x0: np.ndarray, noise: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    """x0 noised to sigma in the samplers' form: x0 + sigma noise (VP models in VE form; diffusers' add_noise divided by
    sqrt(alpha_bar)), or (1 - t) x0 + t noise for flow models (diffusers' FlowMatch scale_noise)."""
    if prediction_type == "flow_prediction":
        return x0 * np.float32(1.0 - sigma) + noise * np.float32(sigma)
    return x0 + noise * np.float32(sigma)
