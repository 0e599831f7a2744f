"""The tiny VAE decoder (TAESD, diffusers' AutoencoderTiny) as an opt-in fast decode: parity with diffusers decoding
through the same AutoencoderTiny, its choice over the CLI and A1111's sd_vae_decode_method, and refusals."""
from __future__ import annotations

import dataclasses

import diffusers
import numpy as np
import pytest
import torch

from sdfast.errors import ConfigError, RequestError
from sdfast.export.tiny_vae import ensure_builtin_tiny_vae
from sdfast.runtime.generation import GenerationRequest
from sdfast.runtime.images import psnr
from sdfast.runtime.pipeline import Pipeline
from tests.conftest import diffusers_reference, run_cli, visible_lines

PROMPT, NEGATIVE = "a harbour at night, lanterns", "blurry"


@pytest.fixture(scope="module")
def pipeline(tiny_fast_engine):
    return Pipeline.load(tiny_fast_engine)


@pytest.mark.parametrize("width", [64, 96])
def test_the_tiny_decoder_matches_diffusers_with_the_same_autoencoder_tiny(pipeline, tiny_model, width):
    reference = diffusers_reference(tiny_model)
    reference.vae = diffusers.AutoencoderTiny.from_pretrained(ensure_builtin_tiny_vae("tiny-taesd"))
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.5, width=width, height=64,
                         generator=torch.Generator("cpu").manual_seed(9), output_type="np").images
    request = GenerationRequest(PROMPT, NEGATIVE, steps=5, cfg_scale=7.5, seed=9, width=width, vae_decoder="tiny")
    result = pipeline.generate(request)
    assert psnr(result.images, (expected * 255).round().astype(np.uint8)) >= 40.0
    full = pipeline.generate(dataclasses.replace(request, vae_decoder="full"))
    assert np.array_equal(full.latents, result.latents)  # the same sampling, another decoder
    assert psnr(full.images, result.images) < 30  # random weights: the two decoders draw different pictures
    assert "VAE decoder: TAESD," in result.parameters[0] and "VAE decoder" not in full.parameters[0]


def test_refusals(pipeline, tiny_engine, tmp_path):
    with pytest.raises(RequestError, match="no tiny VAE decoder: export it with sdfast export --vae-decoder"):
        Pipeline.load(tiny_engine).validate(GenerationRequest("x", vae_decoder="tiny"))
    with pytest.raises(RequestError, match="VAE decoder must be one of full, tiny"):
        pipeline.validate(GenerationRequest("x", vae_decoder="taesd"))
    missing = run_cli("export", "--model", "tiny", "--out", str(tmp_path / "e"), "--vae-decoder", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not an AutoencoderTiny folder" in visible_lines(missing.stderr)[-1]
    assert not (tmp_path / "e").exists()
    from sdfast.export.tiny_vae import load_tiny_vae

    with pytest.raises(ConfigError, match="has 4 latent channels; this model's VAE has 16"):
        load_tiny_vae("tiny-taesd", 16)
    refused = run_cli("generate", str(tiny_engine), PROMPT, "--steps", "2", "--vae-decoder", "tiny", "-o", str(tmp_path / "no.png"))
    assert refused.returncode == 2 and not (tmp_path / "no.png").exists()

