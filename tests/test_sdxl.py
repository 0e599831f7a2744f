"""SDXL: small random SDXL-shaped models (base, 9-channel inpainting, refiner, Turbo scheduler) exported and run by
sdfast equal diffusers' StableDiffusionXL pipelines: every sampler, an empty negative prompt, long prompts, clip skip,
img2img, inpainting, the refiner hand-off and 1-to-4-step Turbo sampling without guidance."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image

from sdfast.errors import EngineError, RequestError
from sdfast.runtime.images import load_init_image, load_mask, psnr
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from sdfast.runtime.prompts import tokenize_weighted
from sdfast.sampling.registry import SAMPLERS
from tests.sampler_harness import diffusers_scheduler_for, reference_config

PROMPT, NEGATIVE, SIZE = "a lighthouse on a cliff at dawn", "blurry", 64


def _export(name: str, out, **options):
    from sdfast.export.build import ExportRequest, export_engine

    return export_engine(ExportRequest(model=name, out=out / name, **options))


def _reference(name: str, pipeline_class: str = "StableDiffusionXLPipeline", scheduler: dict | None = None):
    from sdfast.export.builtin import ensure_builtin

    pipe = getattr(diffusers, pipeline_class).from_pretrained(ensure_builtin(name), add_watermarker=False)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _uint8(images) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def _seeded(seed: int):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def engines(sdfast_cache, tmp_path_factory):
    return tmp_path_factory.mktemp("sdxl-engines")


@pytest.fixture(scope="module")
def sdxl_engine(engines):
    return _export("tiny-sdxl", engines)  # with the CPU variant, as users export


@pytest.fixture(scope="module")
def pipeline(sdxl_engine):
    return Pipeline.load(sdxl_engine)


@pytest.fixture(scope="module")
def reference(sdxl_engine):
    return _reference("tiny-sdxl")


def test_the_manifest_records_what_makes_it_sdxl(sdxl_engine, reference):
    manifest = read_manifest(sdxl_engine)
    assert manifest.family == "sdxl" and manifest.latent["scaling_factor"] == reference.vae.config.scaling_factor == 0.13025
    assert manifest.tokenizers["text_encoder"]["pad_id"] == manifest.tokenizers["text_encoder"]["eos_id"]  # CLIP-L pads with EOS
    assert manifest.tokenizers["text_encoder_2"]["pad_id"] == reference.tokenizer_2.pad_token_id == 0  # OpenCLIP with "!"
    assert manifest.model["time_ids"] == "size" and manifest.model["force_zeros_for_empty_prompt"] is True
    unet = manifest.components["unet"]
    names = [t.name for t in unet.inputs]
    assert names[:5] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    # ControlNet residuals: conv_in's, one per resnet and downsampler of the 2 down blocks (1 resnet each), the mid block's
    assert names[5:] == [f"down_block_residual_{i}" for i in range(4)] + ["mid_block_residual"]
    assert unet.input("encoder_hidden_states").shape[-1] == reference.unet.config.cross_attention_dim == 64  # 32 + 32
    assert unet.input("time_ids").shape == (2, 6) and "cpu" in unet.variants


@pytest.mark.parametrize("key", [spec.key for spec in SAMPLERS.values() if spec.scheduler_class])
def test_every_sampler_matches_diffusers_on_sdxl(pipeline, reference, key):
    spec = SAMPLERS[key]
    reference.scheduler = diffusers_scheduler_for(spec, pipeline.scheduler_config, seed=7)  # the model's own config
    expected = _uint8(reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=SIZE,
                                width=SIZE, generator=_seeded(7), output_type="np").images)
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=7.5, seed=7, sampler=spec.a1111_name))
    assert result.images.std() > 10, "a flat image would make the comparison meaningless"
    assert psnr(result.images, expected) >= 40.0, key


def test_an_empty_negative_prompt_is_zeros_as_force_zeros_for_empty_prompt_says(pipeline, reference):
    """diffusers zeroes the unconditional embeddings when no negative prompt is given (A1111 does the same for an empty
    one); encoding "" instead would give another image."""
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    run = lambda negative: _uint8(reference(PROMPT, negative_prompt=negative, num_inference_steps=8, guidance_scale=5.0,  # noqa: E731
                                            height=SIZE, width=SIZE, generator=_seeded(3), output_type="np").images)
    result = pipeline.generate(GenerationRequest(PROMPT, "", steps=8, cfg_scale=5.0, seed=3, sampler="Euler"))
    assert psnr(result.images, run(None)) >= 40.0
    assert psnr(result.images, run("")) < 35.0


def _chunk_embeddings(reference, encoder: str, ids: np.ndarray, layer: int = -2):
    """Each 77-token chunk through a text encoder on its own, hidden_states[layer] concatenated along tokens: [1, C * 77, D],
    and the first chunk's pooled projection where the encoder has one."""
    model = getattr(reference, encoder)
    with torch.no_grad():
        outputs = model(torch.from_numpy(ids), output_hidden_states=True)
    hidden = outputs.hidden_states[layer].reshape(1, -1, model.config.hidden_size)
    return hidden, (outputs.text_embeds[:1] if hasattr(outputs, "text_embeds") else None)


def test_long_prompts_run_through_both_encoders_chunk_by_chunk(pipeline, reference):
    """A1111 on SDXL: each encoder embeds every 75-token chunk, the two side by side; the pooled output is the first chunk's."""
    long_prompt = ", ".join(f"{word} lighthouse" for word in ["red", "white", "tall", "old", "stone", "lonely"] * 6)
    embeds, negative_embeds = [], []
    for encoder, text in zip(("text_encoder", "text_encoder_2"), pipeline.family.encoders):
        positive = tokenize_weighted(text.tokenizer, long_prompt)
        assert 2 <= positive.chunks <= pipeline.max_text_chunks
        empty = tokenize_weighted(text.tokenizer, "")
        negative = np.concatenate([tokenize_weighted(text.tokenizer, NEGATIVE).ids] + [empty.ids] * (positive.chunks - 1))
        embeds.append(_chunk_embeddings(reference, encoder, positive.ids))
        negative_embeds.append(_chunk_embeddings(reference, encoder, negative))
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    expected = _uint8(reference(
        prompt_embeds=torch.cat([e[0] for e in embeds], -1), pooled_prompt_embeds=embeds[1][1],
        negative_prompt_embeds=torch.cat([e[0] for e in negative_embeds], -1), negative_pooled_prompt_embeds=negative_embeds[1][1],
        num_inference_steps=6, guidance_scale=7.5, height=SIZE, width=SIZE, generator=_seeded(13), output_type="np").images)
    result = pipeline.generate(GenerationRequest(long_prompt, NEGATIVE, steps=6, seed=13))
    assert result.warnings == [] and psnr(result.images, expected) >= 40.0


def test_clip_skip_is_diffusers_sdxl_clip_skip_plus_one(pipeline, reference):
    """Clip skip 2 takes hidden_states[-3] of both encoders, diffusers' SDXL clip_skip=1 (the empty negative is zeros, which
    diffusers, whose negative prompt ignores clip_skip, would otherwise encode at the penultimate layer)."""
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    expected = _uint8(reference(PROMPT, clip_skip=1, num_inference_steps=6, guidance_scale=7.5, height=SIZE, width=SIZE,
                                generator=_seeded(2), output_type="np").images)
    skipped = pipeline.generate(GenerationRequest(PROMPT, "", steps=6, seed=2, clip_skip=2))
    assert psnr(skipped.images, expected) >= 40.0 and "Clip skip: 2" in skipped.parameters[0]
    default = pipeline.generate(GenerationRequest(PROMPT, "", steps=6, seed=2))
    assert psnr(default.images, skipped.images) < 35.0
    with pytest.raises(RequestError, match="clip skip"):
        pipeline.validate(GenerationRequest(PROMPT, clip_skip=pipeline.text_layers + 1))


@pytest.mark.parametrize("sampler, strength", [("Euler", 0.6), ("DDIM", 0.75), ("DPM++ 2M", 0.5)])
def test_img2img_matches_diffusers(pipeline, images, sampler, strength):
    spec = SAMPLERS[next(k for k, s in SAMPLERS.items() if s.a1111_name == sampler)]
    reference = _reference("tiny-sdxl", "StableDiffusionXLImg2ImgPipeline", reference_config(spec.key, spec.config_for(pipeline.scheduler_config)))
    expected = _uint8(reference(PROMPT, image=Image.open(images[0]), strength=strength, negative_prompt=NEGATIVE,
                                num_inference_steps=10, guidance_scale=7.5, generator=_seeded(21), output_type="np").images)
    init = load_init_image(images[0], SIZE, SIZE, [])
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=10, seed=21, sampler=sampler, init_image=init, strength=strength))
    assert result.images.std() > 10 and psnr(result.images, expected) >= 40.0


@pytest.mark.parametrize("strength, sampler", [(0.75, "Euler"), (1.0, "DPM++ 2M")])
def test_inpainting_with_the_base_unet_matches_diffusers(pipeline, images, strength, sampler):
    spec = SAMPLERS[next(k for k, s in SAMPLERS.items() if s.a1111_name == sampler)]
    reference = _reference("tiny-sdxl", "StableDiffusionXLInpaintPipeline", reference_config(spec.key, spec.config_for(pipeline.scheduler_config)))
    expected = _uint8(reference(PROMPT, image=Image.open(images[0]), mask_image=Image.open(images[1]), strength=strength,
                                negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, height=SIZE, width=SIZE,
                                generator=_seeded(4), output_type="np").images)
    init, mask = load_init_image(images[0], SIZE, SIZE, []), load_mask(images[1], SIZE, SIZE, [])
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=10, seed=4, sampler=sampler, init_image=init, mask=mask,
                                                 strength=strength))
    assert psnr(result.images, expected) >= 40.0


def test_nine_channel_inpainting_unet_matches_diffusers(engines, images):
    inpaint = Pipeline.load(_export("tiny-sdxl-inpaint", engines, cpu_variant=False))
    reference = _reference("tiny-sdxl-inpaint", "StableDiffusionXLInpaintPipeline")
    expected = _uint8(reference(PROMPT, image=Image.open(images[0]), mask_image=Image.open(images[1]), strength=1.0,
                                negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, height=SIZE, width=SIZE,
                                generator=_seeded(9), output_type="np").images)
    init, mask = load_init_image(images[0], SIZE, SIZE, []), load_mask(images[1], SIZE, SIZE, [])
    result = inpaint.generate(GenerationRequest(PROMPT, NEGATIVE, steps=10, seed=9, init_image=init, mask=mask))
    assert result.images.std() > 10 and psnr(result.images, expected) >= 40.0


@pytest.fixture(scope="module")
def refiner_engine(engines):
    return _export("tiny-sdxl-refiner", engines, cpu_variant=False)


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DDIM"])
def test_the_refiner_takes_over_as_diffusers_denoising_end_and_start(pipeline, refiner_engine, sampler):
    spec = SAMPLERS[next(k for k, s in SAMPLERS.items() if s.a1111_name == sampler)]
    config = reference_config(spec.key, spec.config_for(pipeline.scheduler_config))
    base = _reference("tiny-sdxl", scheduler=config)
    refiner = _reference("tiny-sdxl-refiner", "StableDiffusionXLImg2ImgPipeline", config)
    latents = base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, denoising_end=0.7, guidance_scale=7.5, height=SIZE, width=SIZE,
                   generator=_seeded(5), output_type="latent").images
    expected = _uint8(refiner(PROMPT, negative_prompt=NEGATIVE, image=latents, num_inference_steps=10, denoising_start=0.7,
                              guidance_scale=7.5, generator=_seeded(5), output_type="np").images)
    refined = Pipeline.load(pipeline.manifest.root)
    refined.attach_refiner(Pipeline.load(refiner_engine))
    steps = []
    result = refined.generate(GenerationRequest(PROMPT, NEGATIVE, steps=10, seed=5, sampler=sampler, refiner_switch=0.7),
                              on_step=lambda d, t: steps.append((d, t)))
    assert result.images.std() > 10 and psnr(result.images, expected) >= 40.0
    assert steps[-1] == (10, 10) and len(result.timings.unet_steps) == 10  # 7 base steps, then 3 refiner steps
    assert "Refiner: tiny-sdxl-refiner [" in result.parameters[0] and "Refiner switch at: 0.7" in result.parameters[0]
    alone = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=10, seed=5, sampler=sampler))
    assert psnr(alone.images, result.images) < 35.0


@pytest.fixture(scope="module")
def turbo_engine(engines):
    return _export("tiny-sdxl-turbo", engines, guidance=False, cpu_variant=False)


def test_the_refiner_refuses_what_cannot_hand_off(pipeline, refiner_engine, turbo_engine):
    with pytest.raises(RequestError, match="needs a refiner"):
        pipeline.generate(GenerationRequest(PROMPT, steps=10, refiner_switch=0.8))
    refined = Pipeline.load(pipeline.manifest.root)
    refined.attach_refiner(Pipeline.load(refiner_engine))
    with pytest.raises(RequestError, match="cannot hand its latents over"):
        refined.generate(GenerationRequest(PROMPT, steps=10, sampler="Heun", refiner_switch=0.7))
    with pytest.raises(RequestError, match="leaves no step"):
        refined.generate(GenerationRequest(PROMPT, steps=1, refiner_switch=0.7))
    with pytest.raises(RequestError, match="between 0 and 1"):
        refined.generate(GenerationRequest(PROMPT, steps=10, refiner_switch=1.0))
    plain = refined.generate(GenerationRequest(PROMPT, steps=3, seed=1))  # no switch: the base alone, nothing said of a refiner
    assert "Refiner" not in plain.parameters[0]
    with pytest.raises(EngineError, match="export both alike"):  # an engine without guidance cannot follow one with it
        refined.attach_refiner(Pipeline.load(turbo_engine))


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_sampling_without_guidance_matches_diffusers(turbo_engine, steps):
    """SDXL Turbo's recipe: Euler a on trailing timesteps, 1 to 4 steps, an engine exported without guidance, cfg 0."""
    turbo = Pipeline.load(turbo_engine)
    assert turbo.scheduler_config["timestep_spacing"] == "trailing" and not turbo.guidance
    reference = _reference("tiny-sdxl-turbo")
    expected = _uint8(reference(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=SIZE, width=SIZE,
                                generator=_seeded(11), output_type="np").images)
    result = turbo.generate(GenerationRequest(PROMPT, steps=steps, cfg_scale=0.0, seed=11, sampler="Euler a"))
    assert result.images.std() > 10 and psnr(result.images, expected) >= 40.0
    assert len(result.timings.unet_steps) == steps


def test_serve_runs_sdxl_and_its_refiner_for_unchanged_a1111_clients(sdxl_engine, refiner_engine):
    """webuiapi as users call it, and A1111's refiner_checkpoint / refiner_switch_at over raw HTTP (webuiapi has no
    arguments for them): the server's images equal the Python API's."""
    import base64
    import io

    httpx = pytest.importorskip("httpx")
    webuiapi = pytest.importorskip("webuiapi")
    from tests.test_serve import Server

    server = Server(sdxl_engine, "--refiner", str(refiner_engine))
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        models = api.get_sd_models()
        assert [m["model_name"] for m in models] == ["tiny-sdxl", "tiny-sdxl-refiner"]
        assert all(m["family"] == "sdxl" and m["sizes"] == ["64x64"] for m in models)
        plain = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, steps=6, width=SIZE, height=SIZE, sampler_name="Euler")
        pipeline = Pipeline.load(sdxl_engine)
        expected = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=7.0, seed=3, sampler="Euler"))
        assert np.array_equal(np.asarray(plain.image), expected.images[0])

        body = {"prompt": PROMPT, "seed": 3, "steps": 10, "width": SIZE, "height": SIZE, "sampler_name": "DPM++ 2M",
                "refiner_checkpoint": models[1]["title"], "refiner_switch_at": 0.6}
        answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))))
        pipeline.attach_refiner(Pipeline.load(refiner_engine))
        refined = pipeline.generate(GenerationRequest(PROMPT, steps=10, cfg_scale=7.0, seed=3, sampler="DPM++ 2M", refiner_switch=0.6))
        assert np.array_equal(image, refined.images[0])
        assert "Refiner switch at: 0.6" in answer.json()["info"]

        wrong = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "sd_xl_refiner_1.0"}, timeout=60)
        assert wrong.status_code == 422 and "refiner_checkpoint" in wrong.text
    finally:
        assert server.stop()


def test_bench_measures_sdxl_on_sdfast_and_diffusers(sdxl_engine, tmp_path):
    """sdfast bench feeds the U-Net the family's own conditioning, and diffusers its added text and time ids."""
    from sdfast.bench.report import BenchRun
    from tests.conftest import run_cli

    out = tmp_path / "bench.json"
    done = run_cli("bench", sdxl_engine, "--backends", "cpu,torch", "--repeat", "1", "--steps", "2", "--format", "json", "--out", out)
    assert done.returncode == 0, done.stderr
    (run,) = BenchRun.load(out)
    for backend in ("cpu", "torch"):
        for metric in ("text_encoder", "unet_step_cfg", "vae_decode", "end_to_end"):
            row = run.value(backend, metric)
            assert row is not None and row.median > 0, (backend, metric)


def test_an_engine_without_guidance_defaults_to_its_distilled_recipe(turbo_engine, tmp_path):
    """Silent on steps, sampler and cfg, the CLI and A1111's and OpenAI's routes give Turbo's recipe (4 steps of its
    scheduler's Euler a, no guidance): the same image as asking for it."""
    import base64
    import io

    httpx = pytest.importorskip("httpx")
    from tests.conftest import run_cli
    from tests.test_serve import Server

    expected = Pipeline.load(turbo_engine).generate(GenerationRequest(PROMPT, steps=4, cfg_scale=1.0, seed=5, sampler="Euler a"))
    out = tmp_path / "turbo.png"
    done = run_cli("generate", turbo_engine, PROMPT, "--seed", "5", "--output", out)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image), expected.images[0])
        assert "Steps: 4, Sampler: Euler a, CFG scale: 1" in image.info["parameters"]
    server = Server(turbo_engine)
    try:
        answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 5}, timeout=120)
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert (info["steps"], info["sampler_name"], info["cfg_scale"]) == (4, "Euler a", 1.0)
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))))
        assert np.array_equal(image, expected.images[0])
        openai = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT, "response_format": "b64_json"}, timeout=120)
        assert openai.status_code == 200, openai.text
        assert "Steps: 4, Sampler: Euler a" in Image.open(io.BytesIO(base64.b64decode(openai.json()["data"][0]["b64_json"]))).info["parameters"]
    finally:
        assert server.stop()
