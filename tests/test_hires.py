"""Hires fix as A1111 runs it, against the same passes composed in diffusers: StableDiffusionPipeline at the base size,
the upscale (torch's interpolate for the latent upscalers, Pillow's Lanczos for images), StableDiffusionImg2ImgPipeline
at the larger size running A1111's steps; with the infotext, the CLI, the A1111 API and the refusals."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image

from sdfast.errors import RequestError
from sdfast.runtime.hires import HiresFix
from sdfast.runtime.images import psnr
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import run_cli, visible_lines

PROMPT, NEGATIVE, STEPS, SEED = "a red apple on a table", "blurry", 6, 42


@pytest.fixture(scope="module")
def engine(tiny_sized_engine):
    return tiny_sized_engine  # 64x64 (the default), 96x64, 64x96, 128x128


@pytest.fixture(scope="module")
def pipeline(engine):
    return Pipeline.load(engine)


def _reference(kind: str, folder, config):
    pipe = getattr(diffusers, kind).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    return pipe


def _theirs(tiny_model, pipeline, hires: HiresFix, crop=(0, 0)):
    """diffusers' passes: the first at 64x64, the upscale, then img2img running A1111's steps of its longer schedule."""
    first = _reference("StableDiffusionPipeline", tiny_model, pipeline.scheduler_config)
    latent = hires.upscaler.startswith("Latent")
    out = first(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent" if latent else "pil").images
    (width, height), _ = hires.target(64, 64)
    if latent:
        mode = {"Latent": "bilinear", "Latent (bicubic)": "bicubic", "Latent (nearest-exact)": "nearest-exact"}[hires.upscaler]
        image = torch.nn.functional.interpolate(out, size=(height // 8, width // 8), mode=mode)
        image = image[:, :, crop[1] // 2:image.shape[2] - (crop[1] + 1) // 2, crop[0] // 2:image.shape[3] - (crop[0] + 1) // 2]
    else:
        image = out[0].resize((width, height), resample=Image.Resampling.LANCZOS)
    schedule, run = hires.schedule(STEPS)
    second = _reference("StableDiffusionImg2ImgPipeline", tiny_model, pipeline.scheduler_config)
    images = second(hires.prompt or PROMPT, image=image, strength=(run + 0.5) / schedule, num_inference_steps=schedule,
                    negative_prompt=NEGATIVE, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(SEED),
                    output_type="np").images  # (run + 0.5) / schedule: diffusers' int(schedule x strength) is A1111's run
    return (images * 255).round().astype(np.uint8)


def _ours(pipeline, hires: HiresFix, **extra):
    return pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, seed=SEED, hires=hires, **extra))


@pytest.mark.parametrize("hires, size, crop", [
    (HiresFix(scale=2.0, upscaler="Latent", denoising_strength=0.7), (128, 128), (0, 0)),
    (HiresFix(scale=2.0, upscaler="Latent (bicubic)", steps=4, denoising_strength=0.55, prompt="a green pear"), (128, 128), (0, 0)),
    # both resize sides: the 96x96 fit is upscaled, then 4 latent rows cropped (A1111's truncate_y)
    (HiresFix(resize_width=96, resize_height=64, upscaler="Latent (nearest-exact)", denoising_strength=0.6), (96, 64), (0, 4)),
    (HiresFix(scale=2.0, upscaler="Lanczos", denoising_strength=0.5), (128, 128), (0, 0)),
])
def test_hires_fix_matches_the_passes_composed_in_diffusers(pipeline, tiny_model, hires, size, crop):
    result = _ours(pipeline, hires)
    expected = _theirs(tiny_model, pipeline, hires, crop)
    assert result.images.shape == expected.shape == (1, size[1], size[0], 3)
    assert result.images.std() > 10
    assert psnr(result.images, expected) >= 40.0
    assert len(result.timings.unet_steps) == STEPS + hires.schedule(STEPS)[1]  # both passes' steps


def test_image_upscale_to_an_odd_size_is_floored_to_whole_cells(pipeline):
    """int(64 x 2.05) = 131 pixels: Lanczos to 131x131, encoded as 128x128 (what a VAE makes of 131), the 128 size."""
    result = _ours(pipeline, HiresFix(scale=2.05, upscaler="Lanczos", steps=2, denoising_strength=0.5))
    assert result.images.shape == (1, 128, 128, 3) and "Hires upscale: 2.05" in result.parameters[0]


def test_hires_infotext_is_a1111s(pipeline):
    hires = HiresFix(scale=2.0, upscaler="Latent (bicubic)", steps=3, denoising_strength=0.55, prompt="a green pear",
                     sampler="DPM++ 2M Karras")
    text = _ours(pipeline, hires, sampler="Euler a").parameters[0]
    assert text.startswith(PROMPT + "\nNegative prompt: blurry\nSteps: 6, Sampler: Euler a, ")
    for entry in ("Size: 64x64", "Denoising strength: 0.55", "Hires sampler: DPM++ 2M Karras", "Hires prompt: a green pear",
                  "Hires upscale: 2", "Hires steps: 3", "Hires upscaler: Latent (bicubic)"):
        assert entry in text, text
    assert text.index("Hires prompt") < text.index("Hires upscale") < text.index("Hires steps") < text.index("Hires upscaler")
    resized = _ours(pipeline, HiresFix(resize_width=96, resize_height=64, steps=2)).parameters[0]
    assert "Hires resize: 96x64" in resized and "Hires upscale:" not in resized


def test_batches_and_seeds_carry_through_both_passes(pipeline):
    hires = HiresFix(scale=2.0, steps=2, denoising_strength=0.5)
    two = pipeline.generate(GenerationRequest(PROMPT, steps=3, seed=5, n_iter=2, hires=hires))
    assert two.images.shape == (2, 128, 128, 3) and two.seeds == [5, 6]
    single = pipeline.generate(GenerationRequest(PROMPT, steps=3, seed=6, hires=hires))
    assert psnr(two.images[1:], single.images) >= 60


@pytest.mark.parametrize("hires, message", [
    (HiresFix(scale=1.5), r"hires fix to 96x96 \(from 64x64\): this engine dir serves 64x64, 96x64, 64x96, 128x128"),
    (HiresFix(upscaler="R-ESRGAN 4x+"), "runs a model whose weights sdfast cannot load yet"),
    (HiresFix(upscaler="Bilinear"), "unknown hires upscaler 'Bilinear'"),
    (HiresFix(denoising_strength=0.0), "hires denoising strength must be above 0"),
    (HiresFix(scale=0.5), "hires scale must be from 1"),
    (HiresFix(steps=20, denoising_strength=0.01), "a second pass of 2000 scheduled steps"),
])
def test_bad_hires_settings_are_refused_before_any_step(pipeline, hires, message):
    with pytest.raises(RequestError, match=message):
        pipeline.validate(GenerationRequest(PROMPT, steps=2, hires=hires))


def test_hires_sampler_that_cannot_start_late_is_refused(pipeline):
    with pytest.raises(RequestError, match="cannot start part-way"):
        pipeline.validate(GenerationRequest(PROMPT, steps=4, hires=HiresFix(sampler="PLMS")))  # the last 4 of 5 steps


def test_cli_hires_writes_the_larger_png(engine, tmp_path):
    out = tmp_path / "hires.png"
    completed = run_cli("generate", engine, PROMPT, "--steps", "3", "--hires-scale", "2", "--hires-upscaler", "Latent (antialiased)",
                        "--hires-steps", "2", "-o", out)
    assert completed.returncode == 0, completed.stderr
    with Image.open(out) as image:
        assert image.size == (128, 128)
        assert "Hires upscaler: Latent (antialiased)" in image.info["parameters"]
    for args, fragment in ((["--hires-scale", "3"], "hires fix to 192x192"), (["--hires-denoise", "0.5"], "--hires-denoise needs --hires-scale"),
                           (["--hires-resize", "wide"], "--hires-resize 'wide' is not WIDTHxHEIGHT"),
                           (["--hires-scale", "2", "--hires-upscaler", "SwinIR_4x"], "'SwinIR_4x' runs a model")):
        completed = run_cli("generate", engine, PROMPT, "--steps", "2", *args, "-o", tmp_path / "no.png")
        assert completed.returncode == 2, completed.stderr
        lines = visible_lines(completed.stderr)
        assert len(lines) == 1 and fragment in lines[0], completed.stderr
        assert not (tmp_path / "no.png").exists()


def test_a1111_api_runs_enable_hr_as_the_pipeline_does(engine, pipeline):
    webuiapi = pytest.importorskip("webuiapi")
    import httpx

    from tests.test_serve import Server

    server = Server(engine)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=7.5, width=64, height=64,
                             sampler_name="Euler", enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.7,
                             hr_second_pass_steps=3)
        assert result.image.size == (128, 128)
        local = _ours(pipeline, HiresFix(scale=2.0, upscaler="Latent", steps=3, denoising_strength=0.7), sampler="Euler")
        assert psnr(np.asarray(result.image)[None], local.images) >= 40
        assert "Hires upscaler: Latent" in result.info["infotexts"][0]
        base = api.baseurl
        body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "enable_hr": True}
        for extra, field in (({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"), ({"hr_scale": 3}, "hr_scale"),
                             ({"hr_resize_x": 200, "hr_resize_y": 200}, "hr_resize_x"), ({"firstphase_width": 32}, "firstphase_width")):
            refused = httpx.post(f"{base}/txt2img", json={**body, **extra}, timeout=60)
            assert refused.status_code == 422 and field in refused.text, (extra, refused.text)
    finally:
        assert server.stop()


def test_hires_with_a_lora_tag_applies_it_in_both_passes(engine, tiny_model, tmp_path_factory):
    pytest.importorskip("peft")
    from sdfast.runtime.lora.library import LoraLibrary
    from tests.conftest import diffusers_reference
    from tests.lora_files import kohya_lora

    folder = tmp_path_factory.mktemp("hires-loras")
    kohya_lora(diffusers_reference(tiny_model), folder / "ink.safetensors", seed=9)
    pipe = Pipeline.load(engine, verify="size")
    pipe.loras.library = LoraLibrary(folder)
    hires = HiresFix(scale=2.0, steps=2, denoising_strength=0.6)
    plain = pipe.generate(GenerationRequest(PROMPT, steps=3, seed=1, hires=hires))
    tagged = pipe.generate(GenerationRequest(PROMPT + " <lora:ink:0.9>", steps=3, seed=1, hires=hires))
    assert tagged.images.shape == (1, 128, 128, 3)
    assert psnr(tagged.images, plain.images) < 35
    assert "<lora:ink:0.9>" in tagged.parameters[0] and 'Lora hashes: "ink: ' in tagged.parameters[0]
    assert pipe.at_size(128, 128).loras.applied and pipe.loras.applied  # both passes' U-Nets carry it
