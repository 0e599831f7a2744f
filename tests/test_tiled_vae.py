"""Tiled VAE: the blending (pure numpy), a one-tile image equal to the untiled decode, and a larger image through
blended tiles close to the untiled decode and closer than the same tiles cut without blending."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sdfast.errors import ConfigError, RequestError
from sdfast.runtime.generation import GenerationRequest
from sdfast.runtime.images import psnr, to_uint8
from sdfast.runtime.pipeline import Pipeline
from sdfast.runtime.tiled_vae import axis_weights, blend_tiles, tile_starts


def test_tiles_cover_the_image_and_their_weights_ramp_across_each_overlap():
    assert tile_starts(8, 8, 2) == [0] and tile_starts(20, 8, 2) == [0, 6, 12]
    assert tile_starts(17, 8, 2) == [0, 6, 9]  # the last tile moved back to end at the edge
    weights = axis_weights([0, 6, 9], 8)
    assert weights[0][:6].tolist() == [1] * 6 and 0 < weights[0][7] < weights[0][6] < 1
    assert 0 < weights[2][0] < weights[2][4] <= 1 and weights[2][-1] == 1
    rng = np.random.default_rng(0)
    source = rng.standard_normal((2, 3, 20, 17)).astype(np.float32)
    (doubled,) = blend_tiles(lambda part: (part * 2,), source, (8, 8), 1.0, (2, 2))
    assert np.allclose(doubled, source * 2, atol=1e-6)  # weights normalize: a pointwise map comes out unchanged
    upsample = lambda part: (part.repeat(8, axis=2).repeat(8, axis=3),)  # noqa: E731 - a decoder's 8x, nearest
    (big,) = blend_tiles(upsample, source, (8, 8), 8.0, (2, 2))
    assert np.allclose(big, source.repeat(8, axis=2).repeat(8, axis=3), atol=1e-6)
    means, stds = blend_tiles(lambda part: (part[:, :, ::8, ::8], part[:, :, ::8, ::8] + 1), big, (64, 64), 1 / 8, (16, 16))
    assert np.allclose(means, source, atol=1e-6) and np.allclose(stds, source + 1, atol=1e-6)  # an encoder's 1/8


@pytest.fixture(scope="module")
def pipeline(tiny_fast_engine):
    return Pipeline.load(tiny_fast_engine)  # 64x64 and 96x64, 64-pixel VAE tiles


def test_a_one_tile_image_is_the_untiled_decode(pipeline):
    request = GenerationRequest("a fox in snow", steps=4, seed=6)
    tiled = pipeline.generate(dataclasses.replace(request, vae_tiling=True))
    untiled = pipeline.generate(request)
    assert np.abs(tiled.images.astype(int) - untiled.images.astype(int)).max() <= 1
    assert "Tiled VAE: 64," in tiled.parameters[0] and "Tiled VAE" not in untiled.parameters[0]


def test_a_larger_image_through_blended_tiles(pipeline):
    sized = pipeline.at_size(96, 64)
    latents = sized.generate(GenerationRequest("a fox in snow", steps=4, seed=6, width=96, height=64)).latents
    untiled = to_uint8(sized.decode(latents))
    blended = to_uint8(sized.decode(latents, tiled=True))
    engine = sized.engines["vae_decoder_tile"]
    unscaled = sized.family.latent.to_vae(latents)
    cut = np.zeros_like(untiled)  # two tiles side by side, the second's first half covered by the first: a seam
    for x in (4, 0):
        (part,) = engine.run({"latent": np.ascontiguousarray(unscaled[:, :, :, x:x + 8])})
        cut[:, :, 8 * x:8 * x + 64] = to_uint8(part)
    assert blended.shape == untiled.shape == (1, 64, 96, 3)
    assert psnr(blended, untiled) > psnr(cut, untiled)
    assert psnr(blended, untiled) >= 20.0


def test_refusals(pipeline, tiny_engine, tmp_path):
    with pytest.raises(RequestError, match="export --vae-tile"):
        Pipeline.load(tiny_engine).validate(GenerationRequest("x", vae_tiling=True))
    with pytest.raises(RequestError, match="not the tiny one"):
        pipeline.validate(GenerationRequest("x", vae_tiling=True, vae_decoder="tiny"))
    from sdfast.export.build import ExportRequest, check_request

    with pytest.raises(ConfigError, match="multiple of 64"):
        check_request(ExportRequest(model="tiny", out=tmp_path / "a", vae_tile=100))
