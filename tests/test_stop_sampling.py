"""Ending sampling early (StopSampling from the step callback, A1111's interrupt): the pipeline decodes the loop's latest x0."""
import numpy as np
import pytest
from PIL import Image

from sdfast.errors import StopSampling
from sdfast.runtime.images import load_init_image, load_mask
from sdfast.runtime.pipeline import GenerationRequest, Pipeline

REQUEST = dict(prompt="a red bicycle", negative_prompt="blurry", steps=6, seed=21, cfg_scale=6.0)


def stop_at(step: int):
    """A step callback that ends sampling once ``step`` steps (counted over the whole request) are done."""

    def on_step(done: int, total: int) -> None:
        if done == step:
            raise StopSampling()

    return on_step


@pytest.fixture(scope="module")
def loops(tiny_engine):
    return {loop: Pipeline.load(tiny_engine, loop=loop, verify="size") for loop in ("numpy", "table")}


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "heun"])
def test_a_stopped_batch_is_its_x0_estimate_in_both_loops(loops, sampler):
    """The samplers' path records the denoiser's output, the tabulated loop its fused D_j: two implementations, one x0."""
    request = GenerationRequest(**REQUEST, sampler=sampler)
    stopped = {loop: pipeline.generate(request, on_step=stop_at(3)) for loop, pipeline in loops.items()}
    full = loops["numpy"].generate(request)
    for result in stopped.values():
        assert result.steps_run == 3 and result.images.shape == full.images.shape and result.images.std() > 0
        assert "Steps: 6," in result.parameters[0] and "Interrupted: after 3 of 6 steps" in result.parameters[0]
        assert np.abs(result.latents - full.latents).max() > 1e-3  # not the finished image
    scale = float(np.abs(full.latents).max())
    np.testing.assert_allclose(stopped["table"].latents, stopped["numpy"].latents, rtol=0, atol=1e-5 * scale)
    assert "Interrupted" not in full.parameters[0] and full.steps_run is None


def test_stopping_after_the_last_euler_step_gives_the_finished_image(loops):
    """Euler's last step lands on sigma 0, where x is exactly the x0 estimate: the stopped result is the finished one."""
    request = GenerationRequest(**REQUEST, sampler="euler")
    full = loops["numpy"].generate(request)
    for pipeline in loops.values():
        last = pipeline.generate(request, on_step=stop_at(6))
        assert last.steps_run == 6
        np.testing.assert_allclose(last.latents, full.latents, rtol=0, atol=1e-5 * float(np.abs(full.latents).max()))
        assert np.abs(last.images.astype(int) - full.images).max() <= 1


def test_a_stop_ends_the_batch_count(loops):
    """Stopped in the second of three batches: the first comes back whole, the second from its x0, the third never runs."""
    request = GenerationRequest(**{**REQUEST, "steps": 4}, n_iter=3)
    batches = list(loops["numpy"].generate_batches(request, on_step=stop_at(4 + 2)))
    assert [b.steps_run for b in batches] == [None, 2] and [b.seeds for b in batches] == [[21], [22]]
    whole = loops["numpy"].generate(GenerationRequest(**{**REQUEST, "steps": 4}))
    np.testing.assert_array_equal(batches[0].images, whole.images)
    joined = loops["numpy"].generate(request, on_step=stop_at(6))
    assert joined.images.shape[0] == 2 and joined.steps_run == 2 and joined.seeds == [21, 22]


def test_a_stopped_inpainting_keeps_the_known_region(loops, tmp_path):
    """Blended inpainting: the stopped x0 gets the final blend too, so the unmasked latents are the init image's exactly."""
    pipeline = loops["numpy"]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image, mask = load_init_image(tmp_path / "init.png", 64, 64, []), load_mask(tmp_path / "mask.png", 64, 64, [])
    request = GenerationRequest(**REQUEST, init_image=image, mask=mask, strength=0.8)
    full = pipeline.generate(request)
    stopped = pipeline.generate(request, on_step=stop_at(2))
    keep = mask[0, 0, ::8, ::8] < 0.5  # keep: [h, w], the latent cells outside the mask
    assert stopped.steps_run == 2 and "of 4 steps" in stopped.parameters[0]  # strength 0.8 of 6 steps runs 4
    np.testing.assert_array_equal(stopped.latents[..., keep], full.latents[..., keep])
    assert np.abs(stopped.latents[..., ~keep] - full.latents[..., ~keep]).max() > 1e-3
