"""img2img, inpainting, clip skip, long and weighted prompts, batch and n-iter: each against diffusers or PyTorch."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image

from sdfast.errors import RequestError
from sdfast.runtime.images import load_init_image, load_mask, psnr
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from sdfast.runtime.prompts import tokenize_weighted
from tests.sampler_harness import reference_config

PROMPT, NEGATIVE = "a red apple on a table", "blurry"
SIZE = 64


def _diffusers(cls_name: str, folder, scheduler: str):
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _as_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pipeline(tiny_engine):
    return Pipeline.load(tiny_engine)


@pytest.fixture(scope="module")
def init_image(tmp_path_factory):
    """A smooth, colourful 64x64 picture (a gradient with a disc), saved as PNG."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    pixels = np.stack([x, y, 1 - (x - 0.5) ** 2 - (y - 0.5) ** 2], axis=-1)
    pixels[(x - 0.4) ** 2 + (y - 0.6) ** 2 < 0.05] = [0.9, 0.1, 0.2]
    path = tmp_path_factory.mktemp("images") / "init.png"
    Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def mask_image(tmp_path_factory):
    """White (repaint) on the right half's middle, black (keep) elsewhere."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 24:56] = 255
    path = tmp_path_factory.mktemp("images") / "mask.png"
    Image.fromarray(mask, mode="L").save(path)
    return path


def _load(pipeline, init_image, mask_image=None):
    warnings = []
    image = load_init_image(init_image, pipeline.width, pipeline.height, warnings)
    mask = load_mask(mask_image, pipeline.width, pipeline.height, warnings) if mask_image else None
    assert warnings == []
    return image, mask


# -- img2img ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, scheduler, strength",
    [("euler", "EulerDiscreteScheduler", 0.6), ("ddim", "DDIMScheduler", 0.75), ("Euler a", "EulerAncestralDiscreteScheduler", 0.5)],
)
def test_img2img_matches_diffusers(pipeline, tiny_model, init_image, sampler, scheduler, strength):
    reference = _diffusers("StableDiffusionImg2ImgPipeline", tiny_model, scheduler)
    expected = _as_uint8(reference(
        PROMPT, image=Image.open(init_image), strength=strength, negative_prompt=NEGATIVE, num_inference_steps=12,
        guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(21), output_type="np",
    ).images)
    image, _ = _load(pipeline, init_image)
    result = pipeline.generate(GenerationRequest(
        PROMPT, NEGATIVE, steps=12, cfg_scale=7.5, seed=21, sampler=sampler, init_image=image, strength=strength,
    ))
    assert result.images.std() > 10
    assert psnr(result.images, expected) >= 40.0
    assert f"Denoising strength: {strength}" in result.parameters[0]


def test_img2img_runs_the_last_steps_times_strength(pipeline, init_image):
    image, _ = _load(pipeline, init_image)
    result = pipeline.generate(GenerationRequest(PROMPT, steps=10, seed=1, init_image=image, strength=0.3))
    assert len(result.timings.unet_steps) == 3  # int(10 * 0.3) Euler steps, one U-Net call each
    with pytest.raises(RequestError, match="no step to run"):
        pipeline.generate(GenerationRequest(PROMPT, steps=10, seed=1, init_image=image, strength=0.05))


def test_init_image_of_another_size_is_resized_with_a_warning(pipeline, tmp_path, init_image):
    bigger = tmp_path / "big.png"
    Image.open(init_image).resize((96, 80)).save(bigger)
    warnings = []
    image = load_init_image(bigger, pipeline.width, pipeline.height, warnings)
    assert image.shape == (1, 3, SIZE, SIZE) and -1.0 <= image.min() and image.max() <= 1.0
    assert warnings == [f"init image is 96x80; resized to the engine's {SIZE}x{SIZE}"]


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"not a picture", "not a readable image")])
def test_bad_init_images_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "init.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RequestError, match=message) as error:
        load_init_image(path, SIZE, SIZE, [])
    assert "\n" not in str(error.value)


def test_sixteen_bit_images_are_scaled_and_huge_ones_refused(tmp_path):
    gradient = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "g16.png")  # mode I;16
    image = load_init_image(tmp_path / "g16.png", SIZE, SIZE, [])
    assert image.min() == -1.0 and image.max() == 1.0 and abs(float(image.mean())) < 0.01  # not clipped to white
    assert load_mask(tmp_path / "g16.png", SIZE, SIZE, []).mean() == pytest.approx(0.5, abs=0.01)
    Image.new("1", (15000, 12000)).save(tmp_path / "bomb.png")  # 22 KB on disk, 180 Mpixel when decoded
    with pytest.raises(RequestError, match="not a readable image"):
        load_init_image(tmp_path / "bomb.png", SIZE, SIZE, [])


# -- inpainting ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength, sampler", [(0.75, "Euler"), (1.0, "DPM++ 2M"), (0.75, "Heun"), (0.75, "DPM2 a Karras")])
def test_inpainting_with_an_ordinary_unet_matches_diffusers(pipeline, tiny_model, init_image, mask_image, strength, sampler):
    """4-channel U-Net: the known region is blended back after every step, and between Heun's / DPM2's two evaluations
    (diffusers' StableDiffusionInpaintPipeline blends after every scheduler call)."""
    from sdfast.sampling.registry import resolve_sampler

    spec = resolve_sampler(sampler)
    reference = _diffusers("StableDiffusionInpaintPipeline", tiny_model, spec.scheduler_class)
    reference.scheduler = getattr(diffusers, spec.scheduler_class).from_config(reference_config(spec.key, pipeline.scheduler_config))
    expected = _as_uint8(reference(
        PROMPT, image=Image.open(init_image), mask_image=Image.open(mask_image), strength=strength, negative_prompt=NEGATIVE,
        num_inference_steps=10, guidance_scale=7.5, height=SIZE, width=SIZE,
        generator=torch.Generator("cpu").manual_seed(4), output_type="np",
    ).images)
    image, mask = _load(pipeline, init_image, mask_image)
    result = pipeline.generate(GenerationRequest(
        PROMPT, NEGATIVE, steps=10, seed=4, sampler=sampler, init_image=image, mask=mask, strength=strength,
    ))
    assert psnr(result.images, expected) >= 40.0
    # The kept region's latents are exactly the encoded image's (sampled) latents; the masked region is new.
    keep = mask[0, 0, ::8, ::8] == 0
    encoded = pipeline.generate(GenerationRequest(PROMPT, steps=10, seed=4, init_image=image, mask=np.ones_like(mask) * 0, strength=strength))
    assert np.array_equal(result.latents[..., keep], encoded.latents[..., keep])
    assert not np.allclose(result.latents[..., ~keep], encoded.latents[..., ~keep])


def test_inpainting_unet_matches_diffusers(tiny_inpaint_engine, init_image, mask_image):
    """9-channel U-Net: latents, the mask and the masked image's latents go in together."""
    from sdfast.export.builtin import ensure_builtin

    reference = _diffusers("StableDiffusionInpaintPipeline", ensure_builtin("tiny-inpaint"), "EulerDiscreteScheduler")
    expected = _as_uint8(reference(
        PROMPT, image=Image.open(init_image), mask_image=Image.open(mask_image), negative_prompt=NEGATIVE,
        num_inference_steps=10, guidance_scale=7.5, height=SIZE, width=SIZE,
        generator=torch.Generator("cpu").manual_seed(9), output_type="np",
    ).images)
    inpaint = Pipeline.load(tiny_inpaint_engine)
    image, mask = _load(inpaint, init_image, mask_image)
    result = inpaint.generate(GenerationRequest(PROMPT, NEGATIVE, steps=10, seed=9, init_image=image, mask=mask))
    assert result.images.std() > 10
    assert psnr(result.images, expected) >= 40.0
    with pytest.raises(RequestError, match="9-channel inpainting U-Net"):
        inpaint.generate(GenerationRequest(PROMPT, steps=2))
    # At strength 1 nothing starts part-way, so samplers that cannot start late still inpaint, as diffusers does.
    whole = inpaint.generate(GenerationRequest(PROMPT, steps=3, seed=9, init_image=image, mask=mask, sampler="DPM++ SDE Karras"))
    reference.scheduler = diffusers.DPMSolverSDEScheduler.from_config(
        {**reference_config("dpmpp_sde_karras", inpaint.scheduler_config), "noise_sampler_seed": 9})
    expected_whole = _as_uint8(reference(
        PROMPT, image=Image.open(init_image), mask_image=Image.open(mask_image), num_inference_steps=3, guidance_scale=7.5,
        height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(9), output_type="np",
    ).images)
    assert whole.images.std() > 10 and psnr(whole.images, expected_whole) >= 40.0
    with pytest.raises(RequestError, match="cannot start part-way"):
        inpaint.generate(GenerationRequest(PROMPT, steps=4, seed=9, init_image=image, mask=mask, sampler="PLMS", strength=0.5))


def test_mask_needs_an_init_image(pipeline, mask_image):
    mask = load_mask(mask_image, SIZE, SIZE, [])
    with pytest.raises(RequestError, match="needs an init image"):
        pipeline.generate(GenerationRequest(PROMPT, steps=2, mask=mask))


# -- clip skip ----------------------------------------------------------------------------------------------


def test_clip_skip_is_the_layer_norm_of_an_earlier_layer(pipeline, tiny_model):
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval()
    ids = tokenize_weighted(pipeline.family.text.tokenizer, PROMPT).ids  # ids: [1, 77]
    rows = np.repeat(ids, 2, axis=0)
    with torch.no_grad():
        hidden_states = text_encoder(torch.from_numpy(rows), output_hidden_states=True).hidden_states
        layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        for clip_skip in range(1, pipeline.text_layers + 1):
            expected = layer_norm(hidden_states[-clip_skip]).numpy()  # A1111: hidden_states[-N], then the final layer norm
            (ours,) = pipeline.engines["text_encoder"].run({"input_ids": rows, "clip_skip": np.array([clip_skip])})
            assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()
    with pytest.raises(RequestError, match="clip skip must be"):
        pipeline.generate(GenerationRequest(PROMPT, steps=2, clip_skip=pipeline.text_layers + 1))


def test_clip_skip_changes_the_image_and_is_recorded(pipeline):
    plain = pipeline.generate(GenerationRequest(PROMPT, steps=3, seed=2))
    skipped = pipeline.generate(GenerationRequest(PROMPT, steps=3, seed=2, clip_skip=2))
    assert not np.array_equal(plain.latents, skipped.latents)
    assert "Clip skip: 2" in skipped.parameters[0] and "Clip skip" not in plain.parameters[0]


# -- long and weighted prompts ------------------------------------------------------------------------------


def _torch_embeddings(text_encoder, ids: np.ndarray) -> torch.Tensor:
    """Each 77-token chunk through the text encoder on its own, concatenated along tokens: [1, chunks * 77, D]."""
    with torch.no_grad():
        return text_encoder(torch.from_numpy(ids))[0].reshape(1, -1, text_encoder.config.hidden_size)


def test_long_prompt_matches_diffusers_with_concatenated_chunk_embeddings(pipeline, tiny_model):
    """A several-chunk prompt and a 1-chunk negative, padded with empty chunks, through the dynamic-length U-Net."""
    long_prompt = ", ".join(f"{word} apple" for word in ["red", "green", "blue", "small", "large", "round"] * 6)
    positive = tokenize_weighted(pipeline.family.text.tokenizer, long_prompt)
    assert 2 <= positive.chunks <= pipeline.max_text_chunks
    negative = tokenize_weighted(pipeline.family.text.tokenizer, NEGATIVE)
    empty = tokenize_weighted(pipeline.family.text.tokenizer, "")
    negative_ids = np.concatenate([negative.ids] + [empty.ids] * (positive.chunks - 1))

    reference = _diffusers("StableDiffusionPipeline", tiny_model, "EulerDiscreteScheduler")
    expected = _as_uint8(reference(
        prompt_embeds=_torch_embeddings(reference.text_encoder, positive.ids),
        negative_prompt_embeds=_torch_embeddings(reference.text_encoder, negative_ids),
        num_inference_steps=8, guidance_scale=7.5, height=SIZE, width=SIZE,
        generator=torch.Generator("cpu").manual_seed(13), output_type="np",
    ).images)
    result = pipeline.generate(GenerationRequest(long_prompt, NEGATIVE, steps=8, seed=13))
    assert result.warnings == []
    assert psnr(result.images, expected) >= 40.0
    # A prompt cut at 77 tokens (what diffusers itself does) gives another image.
    cut = pipeline.generate(GenerationRequest(" ".join(long_prompt.split()[:30]), NEGATIVE, steps=8, seed=13))
    assert not np.array_equal(cut.latents, result.latents)


def test_prompt_beyond_the_engines_chunks_is_cut_with_a_warning(pipeline):
    very_long = "apple " * (75 * pipeline.max_text_chunks + 10)
    result = pipeline.generate(GenerationRequest(very_long, steps=1, seed=0))
    assert any("chunks" in warning and "dropped" in warning for warning in result.warnings)


def test_runaway_emphasis_is_refused(pipeline):
    with pytest.raises(RequestError, match="emphasis"):
        pipeline.generate(GenerationRequest("(" * 200 + "apple", steps=1))
    with pytest.raises(RequestError, match="emphasis"):
        pipeline.generate(GenerationRequest("(apple:" + "9" * 45 + ")", steps=1))


def test_emphasis_weights(pipeline):
    plain = pipeline.generate(GenerationRequest("a red apple", steps=3, seed=5))
    neutral = pipeline.generate(GenerationRequest("a (red:1.0) apple", steps=3, seed=5))
    heavy = pipeline.generate(GenerationRequest("a (red:1.5) apple", steps=3, seed=5))
    assert np.array_equal(plain.latents, neutral.latents)  # weight 1 changes nothing, bit for bit
    assert not np.array_equal(plain.latents, heavy.latents)


# -- batch and n-iter ---------------------------------------------------------------------------------------


def test_n_iter_continues_the_seeds(pipeline):
    result = pipeline.generate(GenerationRequest(PROMPT, steps=3, seed=40, n_iter=3))
    assert result.seeds == [40, 41, 42] and result.images.shape == (3, SIZE, SIZE, 3)
    for index, seed in enumerate(result.seeds):
        alone = pipeline.generate(GenerationRequest(PROMPT, steps=3, seed=seed))
        assert np.array_equal(result.images[index], alone.images[0])
        assert f"Seed: {seed}," in result.parameters[index]


def test_batch_size_below_the_engines_batch(tiny_engine_batch2_unguided):
    engine = Pipeline.load(tiny_engine_batch2_unguided)  # batch 2
    full = engine.generate(GenerationRequest(PROMPT, steps=3, cfg_scale=1.0, seed=7, n_iter=2))
    assert full.seeds == [7, 8, 9, 10]
    assert all("Batch size: 2" in p for p in full.parameters)
    assert [p.split("Batch pos: ")[1][0] for p in full.parameters] == ["0", "1", "0", "1"]
    single = engine.generate(GenerationRequest(PROMPT, steps=3, cfg_scale=1.0, seed=7, batch_size=1, n_iter=2))
    assert single.seeds == [7, 8] and single.images.shape[0] == 2
    assert psnr(single.images[0], full.images[0]) >= 40.0 and psnr(single.images[1], full.images[1]) >= 40.0
    with pytest.raises(RequestError, match="batch size must be from 1 to the engine's batch 2"):
        engine.generate(GenerationRequest(PROMPT, steps=1, cfg_scale=1.0, batch_size=3))
