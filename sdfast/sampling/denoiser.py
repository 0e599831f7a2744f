"""Adapter from an epsilon-, v- or flow-predicting network to a denoiser D(x; sigma) (k-diffusion external.py)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from sdfast.sampling.parametrization import check_prediction_type, denoiser_scalings

# unet(x_in, timestep) -> model output, for x_in: [B, C, H/8, W/8] already scaled by c_in
UNetFn = Callable[[np.ndarray, float], np.ndarray]


class Denoiser:
    """D(x; sigma) = c_skip * x + c_out * F(c_in * x, t(sigma)), the scalings by prediction type (parametrization.py)."""

    def __init__(self, unet: UNetFn, prediction_type: str, timestep_for: Callable[[float], float]):
        self.unet = unet
        self.prediction_type = check_prediction_type(prediction_type)
        self.timestep_for = timestep_for

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        c_in, c_skip, c_out = (np.float32(c) for c in denoiser_scalings(sigma, self.prediction_type))
        output = self.unet(x * c_in, self.timestep_for(sigma))  # output: [B, C, h, w]
        if self.prediction_type != "v_prediction":  # c_skip = 1 (epsilon, flow): skip the multiply, the result is the same
            return x + output * c_out
        return x * c_skip + output * c_out
