"""The fast modes on SDXL (its U-Net feeds text_embeds and time_ids to every graph): step caching, guidance truncation
and the tiny VAE from one tiny-sdxl engine dir, each against diffusers' SDXL pipeline running the same mode."""
from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from sdfast.export.tiny_vae import ensure_builtin_tiny_vae
from sdfast.runtime.generation import GenerationRequest
from sdfast.runtime.images import psnr
from sdfast.runtime.pipeline import Pipeline
from tests.test_step_cache import deepcache_in_torch

PROMPT, NEGATIVE, SIZE = "a red lighthouse, storm", "blurry", 64


@pytest.fixture(scope="module")
def pipeline(sdfast_cache, tmp_path_factory):
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("sdxl-fast") / "engine"
    return Pipeline.load(export_engine(ExportRequest(model="tiny-sdxl", out=out, step_cache=True, guidance_truncation=True,
                                                     tiny_vae="tiny-taesd")))


def _reference(pipeline, **components):
    from sdfast.export.builtin import ensure_builtin

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(ensure_builtin("tiny-sdxl"), add_watermarker=False, **components)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, **extra) -> np.ndarray:
    images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=5.0, height=SIZE, width=SIZE,
                  generator=torch.Generator("cpu").manual_seed(4), output_type="np", **extra).images
    return (images * 255).round().astype(np.uint8)


def _ours(pipeline, **fields) -> np.ndarray:
    return pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, cfg_scale=5.0, seed=4, **fields)).images


def test_step_caching_matches_diffusers_running_deepcache_on_sdxl(pipeline):
    reference = _reference(pipeline)
    exact = _theirs(reference)
    deepcache_in_torch(reference.unet, 3)
    expected = _theirs(reference)
    ours = _ours(pipeline, step_cache=3)
    assert psnr(ours, expected) >= 40.0 and psnr(ours, exact) < psnr(ours, expected) - 3


def test_guidance_truncation_matches_diffusers_dynamic_cfg_on_sdxl(pipeline):
    def dynamic_cfg(pipe, step_index, timestep, kwargs):  # SDXL's conditioning: the embeddings, pooled ones and time ids
        if step_index == int(pipe.num_timesteps * 0.5):
            for name in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
                kwargs[name] = kwargs[name].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return kwargs

    expected = _theirs(_reference(pipeline), callback_on_step_end=dynamic_cfg,
                       callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds", "add_time_ids"])
    assert psnr(_ours(pipeline, guidance_stop=0.5), expected) >= 40.0


def test_the_tiny_vae_matches_diffusers_with_the_same_autoencoder_tiny_on_sdxl(pipeline):
    tiny = diffusers.AutoencoderTiny.from_pretrained(ensure_builtin_tiny_vae("tiny-taesd"))
    assert psnr(_ours(pipeline, vae_decoder="tiny"), _theirs(_reference(pipeline, vae=tiny))) >= 40.0
