"""sdfast's fp32 CPU images equal diffusers' StableDiffusionPipeline for the same folder, seed, sampler and steps."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdfast.runtime.images import psnr
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from sdfast.sampling.registry import SAMPLERS
from tests.conftest import diffusers_reference
from tests.sampler_harness import diffusers_scheduler_for

PROMPT, NEGATIVE = "a red apple on a table", "blurry"


@pytest.fixture(scope="module")
def reference_pipeline(tiny_model):
    return diffusers_reference(tiny_model)


@pytest.fixture(scope="module")
def pipeline(tiny_engine):
    return Pipeline.load(tiny_engine)


@pytest.mark.parametrize(
    "sampler, scheduler_class, steps, cfg",
    [("euler", "EulerDiscreteScheduler", 20, 7.5), ("ddim", "DDIMScheduler", 20, 7.5), ("euler", "EulerDiscreteScheduler", 8, 1.0)],
)
def test_image_matches_diffusers(pipeline, reference_pipeline, sampler, scheduler_class, steps, cfg):
    reference_pipeline.scheduler = getattr(diffusers, scheduler_class).from_config(pipeline.scheduler_config)
    expected = reference_pipeline(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=cfg, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(42), output_type="np",
    ).images
    expected = (expected * 255).round().astype(np.uint8)
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=steps, cfg_scale=cfg, seed=42, sampler=sampler))
    assert result.images.shape == expected.shape == (1, 64, 64, 3)
    assert result.images.std() > 10, "a saturated or flat image would make the comparison meaningless"
    assert psnr(result.images, expected) >= 40.0


@pytest.mark.parametrize("key", [spec.key for spec in SAMPLERS.values() if spec.scheduler_class])
def test_every_sampler_matches_its_diffusers_scheduler_end_to_end(pipeline, reference_pipeline, key):
    """The whole pipeline, with guidance, for each sampler; DPM++ SDE's Brownian tree gets noise_sampler_seed = the seed."""
    spec = SAMPLERS[key]
    reference_pipeline.scheduler = diffusers_scheduler_for(spec, pipeline.scheduler_config, seed=42)  # the model's own config
    expected = reference_pipeline(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(42), output_type="np",
    ).images
    expected = (expected * 255).round().astype(np.uint8)
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=7.5, seed=42, sampler=spec.a1111_name))
    assert result.images.std() > 10
    assert psnr(result.images, expected) >= 40.0
    assert f"Sampler: {spec.a1111_name}," in result.parameters[0]


def test_ddim_eta_matches_diffusers(pipeline, reference_pipeline):
    reference_pipeline.scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler_config)
    expected = reference_pipeline(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, eta=0.6, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(42), output_type="np",
    ).images
    expected = (expected * 255).round().astype(np.uint8)
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=42, sampler="DDIM", eta=0.6))
    plain = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=42, sampler="DDIM"))
    assert psnr(result.images, expected) >= 40.0 and not np.array_equal(result.latents, plain.latents)
    assert "Eta DDIM: 0.6" in result.parameters[0]
    from sdfast.errors import RequestError

    with pytest.raises(RequestError, match="eta applies to DDIM only"):
        pipeline.generate(GenerationRequest(PROMPT, steps=2, sampler="Euler", eta=0.5))


def test_same_seed_same_image_other_seed_other_image(pipeline):
    request = GenerationRequest(PROMPT, steps=4, seed=7)
    first, second = pipeline.generate(request), pipeline.generate(request)
    assert np.array_equal(first.images, second.images)
    other = pipeline.generate(GenerationRequest(PROMPT, steps=4, seed=8))
    assert not np.array_equal(first.images, other.images)


def test_guidance_scale_changes_the_image(pipeline):
    low = pipeline.generate(GenerationRequest(PROMPT, steps=4, cfg_scale=1.0, seed=3))
    high = pipeline.generate(GenerationRequest(PROMPT, steps=4, cfg_scale=9.0, seed=3))
    assert not np.array_equal(low.latents, high.latents)


def test_batch_images_use_consecutive_seeds_and_unguided_engine_matches_cfg_1(pipeline, tiny_engine_batch2_unguided):
    """Image i of a batch is the image seed + i gives alone; a --no-guidance engine equals a guided one at cfg 1."""
    unguided = Pipeline.load(tiny_engine_batch2_unguided)
    batch = unguided.generate(GenerationRequest(PROMPT, steps=6, cfg_scale=1.0, seed=5))
    assert batch.images.shape == (2, 64, 64, 3) and batch.seeds == [5, 6]
    for index, seed in enumerate(batch.seeds):
        alone = pipeline.generate(GenerationRequest(PROMPT, steps=6, cfg_scale=1.0, seed=seed))
        assert psnr(batch.images[index], alone.images[0]) >= 40.0
        assert f"Seed: {seed}," in batch.parameters[index]


def test_unguided_engine_refuses_guidance(tiny_engine_batch2_unguided):
    from sdfast.errors import RequestError

    with pytest.raises(RequestError, match="without classifier-free guidance"):
        Pipeline.load(tiny_engine_batch2_unguided).generate(GenerationRequest(PROMPT, steps=2, cfg_scale=7.5))


def test_unsupported_scheduler_options_are_refused(pipeline):
    from sdfast.errors import ConfigError
    from sdfast.sampling.registry import resolve_sampler

    config = {**pipeline.scheduler_config, "use_karras_sigmas": True}
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        resolve_sampler("euler").plan(config, pipeline.schedule, 10)
