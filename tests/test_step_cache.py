"""Step caching (DeepCache): the shallow U-Net against diffusers' U-Net, its graphs, and whole images against diffusers
running the same cached schedule in PyTorch."""
from __future__ import annotations

import dataclasses

import diffusers
import numpy as np
import pytest
import torch

from sdfast.errors import RequestError
from sdfast.export import step_cache
from sdfast.runtime.generation import GenerationRequest
from sdfast.runtime.images import psnr
from sdfast.runtime.pipeline import Pipeline
from tests.conftest import diffusers_reference, run_cli, visible_lines

PROMPT, NEGATIVE, STEPS = "a lighthouse on a cliff at dusk", "blurry", 9


@pytest.fixture(scope="module")
def cached_engine(tiny_fast_engine):
    """tiny with the step cache's graphs (and a tiny VAE), at 64x64 and 96x64."""
    return tiny_fast_engine


@pytest.fixture(scope="module")
def pipeline(cached_engine):
    return Pipeline.load(cached_engine)


def deepcache_in_torch(unet, interval: int, depth: int = 1) -> None:
    """Patch diffusers' U-Net to run DeepCache's uniform schedule in PyTorch: the full U-Net every ``interval`` calls
    (keeping its deep feature), the shallow branch on that feature in between."""
    original, state = unet.forward, {"calls": 0, "feature": None}

    def forward(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True, **kwargs):
        call, state["calls"] = state["calls"], state["calls"] + 1
        if call % interval == 0:
            noise, state["feature"] = step_cache.with_feature(unet, depth, lambda: original(
                sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                return_dict=False, **kwargs)[0])
        else:
            noise = step_cache.shallow_forward(unet, depth, sample, timestep, encoder_hidden_states, added_cond_kwargs,
                                               state["feature"])
        return (noise,)

    unet.forward = forward


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_the_shallow_branch_on_its_own_feature_is_the_whole_unet(model, sdfast_cache):
    from diffusers import UNet2DConditionModel

    from sdfast.export.builtin import ensure_builtin

    unet = UNet2DConditionModel.from_pretrained(ensure_builtin(model) / "unet").eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 12, generator=generator)
    timestep, states = torch.tensor([700.0, 700.0]), torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=generator), "time_ids": torch.randn(2, 6, generator=generator)}
    with torch.no_grad():
        expected = unet(sample, timestep, encoder_hidden_states=states, added_cond_kwargs=added, return_dict=False)[0]
        for depth in range(len(unet.down_blocks[0].resnets) + 1):
            noise, feature = step_cache.with_feature(unet, depth, lambda: unet(
                sample, timestep, encoder_hidden_states=states, added_cond_kwargs=added, return_dict=False)[0])
            assert tuple(feature.shape[1:]) == step_cache.feature_shape(unet, depth, 8, 12)
            assert torch.equal(noise, expected)
            shallow = step_cache.shallow_forward(unet, depth, sample, timestep, states, added, feature)
            assert torch.allclose(shallow, expected, atol=1e-5, rtol=0), depth
            # a stale feature changes the output: the shallow branch does use it
            assert not torch.allclose(step_cache.shallow_forward(unet, depth, sample, timestep, states, added, feature * 1.5), expected)


@pytest.mark.parametrize("size", ["64x64", "96x64"])
def test_the_shallow_graph_on_the_full_graphs_feature_gives_the_full_graphs_output(pipeline, cached_engine, size):
    sized = pipeline.at_size(*map(int, size.split("x")))
    manifest = sized.manifest
    full = sized.engines["unet"]
    shallow = sized.engines["unet_shallow"]
    assert [spec.name for spec in full.info.outputs] == ["noise_pred", "step_cache_feature"]
    assert shallow.info.input("step_cache_feature").shape == full.info.outputs[1].shape
    rng = np.random.default_rng(5)
    feeds = {**sized.zero_residuals, "sample": rng.standard_normal(full.info.input("sample").shape).astype(np.float32),
             "timestep": np.full((2,), 600, np.float32), "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    noise, feature = full.run(feeds)
    shallow_feeds = {spec.name: feeds[spec.name] for spec in shallow.info.inputs if spec.name != "step_cache_feature"}
    (again,) = shallow.run({**shallow_feeds, "step_cache_feature": feature})
    assert np.abs(again - noise).max() <= 1e-5 * np.abs(noise).max()
    assert manifest.components["unet_shallow"].role == "denoiser_shallow"


@pytest.mark.parametrize("interval", [2, 3])
def test_a_step_cached_image_matches_diffusers_running_deepcache(pipeline, tiny_model, interval):
    reference = diffusers_reference(tiny_model)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    exact = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                      generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
    deepcache_in_torch(reference.unet, interval)
    expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                         generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
    expected, exact = ((images * 255).round().astype(np.uint8) for images in (expected, exact))
    calls = []
    for name in ("unet", "unet_shallow"):  # which graph each evaluation ran
        engine, run = pipeline.engines[name], pipeline.engines[name].run
        engine.run = lambda feeds, name=name, run=run: calls.append(name) or run(feeds)
    try:
        result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, seed=7, step_cache=interval))
    finally:
        for name in ("unet", "unet_shallow"):
            del pipeline.engines[name].run  # the class's method again
    assert calls == ["unet" if step % interval == 0 else "unet_shallow" for step in range(STEPS)]
    assert psnr(result.images, expected) >= 40.0
    assert psnr(result.images, exact) < psnr(result.images, expected) - 3  # the cache changed the image, as DeepCache's does
    assert f"Step cache: DeepCache every {interval}," in result.parameters[0]


def test_interval_one_and_other_sizes(pipeline):
    request = GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=7.5, seed=3, sampler="dpm++ 2m")
    exact = pipeline.generate(request)
    assert np.array_equal(pipeline.generate(dataclasses.replace(request, step_cache=1)).images, exact.images)
    assert "Step cache" not in exact.parameters[0]
    wide = pipeline.generate(dataclasses.replace(request, width=96, step_cache=2))
    assert wide.images.shape == (1, 64, 96, 3) and wide.images.std() > 10
    assert psnr(wide.images, pipeline.generate(dataclasses.replace(request, width=96)).images) > 25


def test_step_cache_refusals(pipeline, tiny_engine):
    request = GenerationRequest(PROMPT, steps=4, step_cache=2)
    with pytest.raises(RequestError, match="export --step-cache"):
        Pipeline.load(tiny_engine).validate(request)
    for interval in (0, 11, True, 2.5):
        with pytest.raises(RequestError, match="step cache interval must be an integer from 1 to 10"):
            pipeline.validate(dataclasses.replace(request, step_cache=interval))
    with pytest.raises(RequestError, match="not run with LoRAs"):
        pipeline.validate(dataclasses.replace(request, prompt="a cat <lora:missing:0.5>"))
    with pytest.raises(RequestError, match="not with a sampler that evaluates twice"):
        pipeline.validate(dataclasses.replace(request, sampler="heun"))
    pipeline.validate(request)  # and a plain one passes


def test_the_cli_runs_and_refuses_the_step_cache(cached_engine, tiny_engine, tmp_path):
    out = tmp_path / "cached.png"
    done = run_cli("generate", str(cached_engine), PROMPT, "--steps", "4", "--step-cache", "2", "-o", str(out))
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert "Step cache: DeepCache every 2" in Image.open(out).info["parameters"]
    refused = run_cli("generate", str(tiny_engine), PROMPT, "--steps", "4", "--step-cache", "2", "-o", str(tmp_path / "no.png"))
    assert refused.returncode == 2 and not (tmp_path / "no.png").exists()
    assert visible_lines(refused.stderr)[-1].endswith("export it with sdfast export --step-cache")
    family = run_cli("export", "--model", "tiny-sd3", "--out", str(tmp_path / "sd3"), "--step-cache")
    assert family.returncode == 2 and "U-Net families" in visible_lines(family.stderr)[-1]
    assert not (tmp_path / "sd3").exists()


def test_a1111_clients_ask_for_the_fast_modes_as_a1111_and_its_extensions_do(cached_engine, pipeline):
    """sd-webui-deepcache's options in override_settings (per request) or /sdapi/v1/options (for every request); the
    tiny VAE by A1111's sd_vae_decode_method 'TAESD'."""
    import httpx
    import webuiapi

    from tests.test_serve import Server

    settings = {"deepcache_enable": True, "deepcache_full_run_step_rate": 3}
    expected = pipeline.generate(GenerationRequest("a boat", steps=6, seed=5, sampler="euler", step_cache=3)).images[0]
    server = Server(cached_engine)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        result = api.txt2img(prompt="a boat", seed=5, steps=6, width=64, height=64, sampler_name="Euler", cfg_scale=7.5,
                             override_settings=settings)
        assert np.array_equal(np.asarray(result.image), expected)
        assert "Step cache: DeepCache every 3" in result.info["infotexts"][0]
        plain = api.txt2img(prompt="a boat", seed=5, steps=6, width=64, height=64, sampler_name="Euler", cfg_scale=7.5)
        assert "Step cache" not in plain.info["infotexts"][0]
        api.set_options(settings)
        assert np.array_equal(np.asarray(api.txt2img(prompt="a boat", seed=5, steps=6, width=64, height=64, sampler_name="Euler",
                                                     cfg_scale=7.5).image), expected)
        bad = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"deepcache_full_run_step_rate": 0}})
        assert bad.status_code == 422 and bad.json()["field"] == "override_settings.deepcache_full_run_step_rate"
        tiny = pipeline.generate(GenerationRequest("a boat", steps=3, seed=5, sampler="euler", vae_decoder="tiny")).images[0]
        result = api.txt2img(prompt="a boat", seed=5, steps=3, width=64, height=64, sampler_name="Euler", cfg_scale=7.5,
                             override_settings={"sd_vae_decode_method": "TAESD", "deepcache_enable": False})
        assert np.array_equal(np.asarray(result.image), tiny) and "VAE decoder: TAESD" in result.info["infotexts"][0]
        bad = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"sd_vae_decode_method": "Approx"}})
        assert bad.status_code == 422 and bad.json()["field"] == "override_settings.sd_vae_decode_method"
    finally:
        assert server.stop()
