"""Latent resampling as torch.nn.functional.interpolate does it, in numpy: hires fix's latent upscalers.

A1111's hires fix resizes latents with ``F.interpolate(x, size, mode, antialias)`` (modules/shared_items.py,
latent_upscale_modes). Each mode is separable: out = R_h · x · R_wᵀ with one [out, in] matrix per axis, built
here with ATen's index and weight rules (aten/src/ATen/native/UpSample.h, UpSampleKernel.cpp), so a seed's
hires image matches A1111's second pass.
"""
from __future__ import annotations

import numpy as np

# A1111's names -> (torch mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel (Keys 1981) with parameter ``a``."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(size_in: int, size_out: int, mode: str, antialias: bool = False) -> np.ndarray:
    """[size_out, size_in] float64: row i weighs the input samples that output sample i reads (align_corners=False)."""
    scale = size_in / size_out
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    rows = np.arange(size_out)
    if mode in ("nearest", "nearest-exact"):
        offset = 0.5 if mode == "nearest-exact" else 0.0
        # in float32, as ATen computes it: (dst + offset) x (in / out), floored
        position = (rows + offset).astype(np.float32) * (np.float32(size_in) / np.float32(size_out))
        source = np.minimum(np.floor(position).astype(np.int64), size_in - 1)
        matrix[rows, source] = 1.0
        return matrix
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"resampling mode '{mode}' is not one of nearest, nearest-exact, bilinear, bicubic")
    if antialias:  # ATen's _compute_index_ranges_weights: a filter stretched by the scale when shrinking
        taps = 2 if mode == "bilinear" else 4
        support = taps * 0.5 * scale if scale >= 1.0 else taps * 0.5
        inverse = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(size_out):
            center = scale * (i + 0.5)
            start = max(int(center - support + 0.5), 0)
            stop = min(int(center + support + 0.5), size_in)
            x = (np.arange(start, stop) - center + 0.5) * inverse
            weights = np.maximum(0.0, 1.0 - np.abs(x)) if mode == "bilinear" else _cubic(x, -0.5)
            total = weights.sum()
            matrix[i, start:stop] = weights / total if total != 0 else weights
        return matrix
    source = (rows + 0.5) * scale - 0.5
    if mode == "bilinear":
        source = np.maximum(source, 0.0)  # ATen clamps negative source coordinates for linear modes
        low = np.floor(source).astype(np.int64)
        frac = source - low
        high = np.minimum(low + 1, size_in - 1)
        np.add.at(matrix, (rows, low), 1.0 - frac)
        np.add.at(matrix, (rows, high), frac)
        return matrix
    low = np.floor(source).astype(np.int64)
    frac = source - low
    for tap in range(-1, 3):  # indices past the edge read the edge sample
        np.add.at(matrix, (rows, np.clip(low + tap, 0, size_in - 1)), _cubic(tap - frac, -0.75))
    return matrix


def resize_latents(latents: np.ndarray, height: int, width: int, mode: str, antialias: bool = False) -> np.ndarray:
    """latents [B, C, h, w] -> [B, C, height, width], float32, as F.interpolate(latents, (height, width), mode, antialias)."""
    rows = resize_matrix(latents.shape[2], height, mode, antialias)  # [height, h]
    cols = resize_matrix(latents.shape[3], width, mode, antialias)  # [width, w]
    out = np.einsum("hy,bcyx,wx->bchw", rows, latents.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


def resize_latents_a1111(latents: np.ndarray, height: int, width: int, name: str) -> np.ndarray:
    """A1111's latent upscaler ``name`` (hr_upscaler), a ValueError naming the known ones otherwise."""
    if name not in LATENT_MODES:
        raise ValueError(f"'{name}' is not a latent upscaler ({', '.join(LATENT_MODES)})")
    mode, antialias = LATENT_MODES[name]
    return resize_latents(latents, height, width, mode, antialias)

