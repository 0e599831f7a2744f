"""Latent resampling in numpy equals torch.nn.functional.interpolate, mode by mode (A1111's hires latent upscalers)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdfast.runtime.resample import LATENT_MODES, resize_latents, resize_latents_a1111


@pytest.mark.parametrize("name", list(LATENT_MODES))
@pytest.mark.parametrize("size_in, size_out", [((64, 64), (128, 128)), ((64, 96), (96, 144)), ((40, 56), (61, 83)),
                                              ((64, 64), (48, 40)), ((7, 9), (7, 9))])
def test_each_latent_upscaler_matches_torch_interpolate(name, size_in, size_out):
    mode, antialias = LATENT_MODES[name]
    latents = np.random.default_rng(sum(size_in + size_out)).standard_normal((2, 4, *size_in)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(latents), size=size_out, mode=mode, antialias=antialias).numpy()
    got = resize_latents_a1111(latents, *size_out, name)
    assert got.shape == expected.shape == (2, 4, *size_out) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)  # torch sums in float32, this in float64


def test_unknown_modes_are_refused_by_name():
    latents = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="not a latent upscaler"):
        resize_latents_a1111(latents, 16, 16, "ESRGAN_4x")
    with pytest.raises(ValueError, match="is not one of"):
        resize_latents(latents, 16, 16, "area")
