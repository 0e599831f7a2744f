"""Adapter from an epsilon- or v-predicting U-Net to a denoiser D(x; sigma) (k-diffusion external.py)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from sdfast.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")

# unet(x_in, timestep) -> model output, for x_in: [B, C, H/8, W/8] already scaled by c_in
UNetFn = Callable[[np.ndarray, float], np.ndarray]


class Denoiser:
    """D(x; sigma) for VP-trained models: c_in = 1/sqrt(sigma^2+1), and c_skip/c_out by prediction type (Karras et al. 2022, Table 1)."""

    def __init__(self, unet: UNetFn, prediction_type: str, timestep_for: Callable[[float], float]):
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction type '{prediction_type}' is not supported ({', '.join(PREDICTION_TYPES)})")
        self.unet = unet
        self.prediction_type = prediction_type
        self.timestep_for = timestep_for

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        c_in = np.float32(1.0 / (sigma**2 + 1.0) ** 0.5)
        output = self.unet(x * c_in, self.timestep_for(sigma))  # output: [B, C, h, w]
        if self.prediction_type == "epsilon":
            return x - output * np.float32(sigma)
        c_skip = np.float32(1.0 / (sigma**2 + 1.0))
        c_out = np.float32(-sigma / (sigma**2 + 1.0) ** 0.5)
        return x * c_skip + output * c_out
