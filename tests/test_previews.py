"""Live previews: the latent-to-RGB map against A1111's cheap approximation, and the families' coefficients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdfast.runtime.families import family_class
from sdfast.runtime.previews import approx_cheap


# A1111's sd_vae_approx.cheap_approximation, as its source writes them (SD3's first and last rows shown)
A1111 = {
    "sd15": [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    "sdxl": [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163], [-0.3730, -0.2499, -0.2088]],
    "sd3": [[-0.0645, 0.0177, 0.1052], [-0.1418, -0.1457, -0.1259]],
}


@pytest.mark.parametrize("family, channels", [("sd15", 4), ("sdxl", 4), ("sd3", 16)])
def test_the_preview_is_a1111s_cheap_approximation(family, channels):
    coefficients = family_class(family).preview_rgb
    assert np.asarray(coefficients).shape == (channels, 3)
    pinned = A1111[family]
    assert np.allclose(coefficients[0], pinned[0]) and np.allclose(coefficients[-1], pinned[-1])
    assert family == "sd3" or np.allclose(coefficients, pinned)
    latents = np.random.default_rng(0).standard_normal((channels, 12, 20)).astype(np.float32) * 1.5
    # A1111: sd_vae_approx.cheap_approximation, then samples_to_images' ((x + 1) / 2).clamp(0, 1) * 255
    theirs = torch.einsum("lxy,lr -> rxy", torch.from_numpy(latents), torch.tensor(coefficients))
    theirs = (torch.clamp((theirs + 1.0) / 2.0, 0.0, 1.0) * 255.0).permute(1, 2, 0).numpy()
    ours = approx_cheap(latents, coefficients)
    assert ours.shape == (12, 20, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(np.float64) - theirs).max() <= 0.5 + 1e-3  # rounded, not truncated
    assert 0 in ours and 255 in ours  # clamped both ways
