"""ControlNet: small random ControlNets added to exported engine dirs run as diffusers' ControlNet pipelines do
(txt2img, img2img, inpainting, SDXL, several at once, guess mode, guidance start and end), and bad input is refused."""
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image

from sdfast.errors import RequestError
from sdfast.runtime.control import ControlUnit
from sdfast.runtime.control_images import control_array, rgb_pixels
from sdfast.runtime.images import load_init_image, load_mask, psnr
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import run_cli

PROMPT, NEGATIVE, SIZE = "a lighthouse on a cliff at dawn", "blurry", 64


def _export(model: str, out, *controlnets, **options):
    from sdfast.export.build import ExportRequest, export_engine
    from sdfast.export.controlnet_export import ControlNetExportRequest, export_controlnet

    engine = export_engine(ExportRequest(model=model, out=out / model, **options))
    for source, name in controlnets:
        export_controlnet(ControlNetExportRequest(source, engine, name))
    return engine


def _controlnet(name: str):
    from sdfast.export.builtin_controlnet import ensure_builtin_controlnet

    return diffusers.ControlNetModel.from_pretrained(ensure_builtin_controlnet(name))


def _reference(pipeline_class: str, base: str, controlnet, scheduler_config: dict):
    from sdfast.export.builtin import ensure_builtin

    options = {"add_watermarker": False} if "XL" in pipeline_class else {"safety_checker": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, pipeline_class).from_pretrained(ensure_builtin(base), controlnet=controlnet, **options)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _uint8(images) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def _run(reference, *args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' image (uint8) and final latents for the same call, each from its own seeded generator."""
    seed = kwargs.pop("seed")
    image = _uint8(reference(*args, generator=_seeded(seed), output_type="np", **kwargs).images)
    return image, reference(*args, generator=_seeded(seed), output_type="latent", **kwargs).images.numpy()


def _assert_parity(result, expected: tuple[np.ndarray, np.ndarray], without) -> None:
    """PSNR >= 40 dB against diffusers' image; the latents' gap to diffusers' is tiny, and dwarfed by their gap to the
    run ``without`` the ControlNet (or with other settings), or the comparison would prove nothing."""
    image, latents = expected
    gap = np.abs(result.latents - latents).max()
    assert result.images.std() > 10 and psnr(result.images, image) >= 40.0
    assert gap < 1e-3 * np.abs(latents).max(), gap
    assert np.abs(without.latents - latents).max() > 30 * gap


def _seeded(seed: int):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def engine(sdfast_cache, tmp_path_factory):
    return _export("tiny", tmp_path_factory.mktemp("control-engines"), ("tiny-controlnet", "canny"), ("tiny-controlnet-2", "depth"))


@pytest.fixture(scope="module")
def pipeline(engine):
    return Pipeline.load(engine)


@pytest.fixture(scope="module")
def control(images):
    """The control map: the smooth test picture, at the engine's size (as a depth map would come, made elsewhere)."""
    return Image.open(images[0]).convert("RGB")


def _unit(name: str, image, **options) -> ControlUnit:
    return ControlUnit(name, control_array(rgb_pixels(image)), **options)


def test_the_controlnet_is_a_component_of_the_engine_dir_with_its_parity(engine):
    manifest = read_manifest(engine)
    canny = manifest.components["controlnet_canny"]
    assert canny.role == "controlnet" and "cpu" in canny.variants
    entry = manifest.data["components"]["controlnet_canny"]
    assert entry["parity"]["passed"] and entry["parity"]["max_rel"] < 1e-4 and entry["variants"]["cpu"]["parity"]["passed"]
    assert entry["controlnet"]["name"] == "canny" and entry["controlnet"]["source"]["fingerprint"].startswith("sha256:")
    residuals = [spec for spec in manifest.components["unet"].inputs if spec.name.endswith("residual") or "_residual_" in spec.name]
    assert [(spec.name, spec.shape) for spec in canny.outputs] == [(spec.name, spec.shape) for spec in residuals]
    manifest.verify_files()  # every file the manifest lists, the ControlNets' too, is there with its hash


@pytest.mark.parametrize("weight, start, end", [(1.0, 0.0, 1.0), (0.8, 0.0, 0.5), (1.0, 0.25, 1.0)])
def test_one_controlnet_matches_diffusers_with_guidance_start_and_end(pipeline, control, weight, start, end):
    reference = _reference("StableDiffusionControlNetPipeline", "tiny", _controlnet("tiny-controlnet"), pipeline.scheduler_config)
    expected = _uint8(reference(PROMPT, image=control, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5,
                                controlnet_conditioning_scale=weight, control_guidance_start=start, control_guidance_end=end,
                                generator=_seeded(3), output_type="np").images)
    latents = reference(PROMPT, image=control, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5,
                        controlnet_conditioning_scale=weight, control_guidance_start=start, control_guidance_end=end,
                        generator=_seeded(3), output_type="latent").images.numpy()
    unit = _unit("canny", control, weight=weight, guidance_start=start, guidance_end=end)
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=3, control=(unit,)))
    assert result.images.std() > 10 and psnr(result.images, expected) >= 40.0
    # the ControlNet, and its window, must matter: the latents' gap to those without it (or with the whole window)
    # dwarfs their gap to diffusers', or the comparison proves nothing
    gap = np.abs(result.latents - latents).max()
    assert gap < 1e-3 * np.abs(latents).max()
    plain = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=3))
    assert np.abs(plain.latents - latents).max() > 30 * gap
    if (start, end) != (0.0, 1.0):
        whole = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=3, control=(_unit("canny", control, weight=weight),)))
        assert np.abs(whole.latents - latents).max() > 30 * gap
    assert 'ControlNet 0: "Module: none, Model: canny [' in result.parameters[0] and f"Guidance Start: {start}" in result.parameters[0]


def test_two_controlnets_sum_as_diffusers_multicontrolnet(pipeline, control, images):
    second = Image.open(images[1]).convert("RGB")  # the mask picture as a second control map
    reference = _reference("StableDiffusionControlNetPipeline", "tiny", [_controlnet("tiny-controlnet"), _controlnet("tiny-controlnet-2")],
                           pipeline.scheduler_config)
    expected = _run(reference, PROMPT, image=[control, second], negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5,
                    controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25], control_guidance_end=[1.0, 0.75],
                    seed=5)
    first = _unit("canny", control, weight=0.8)
    units = (first, _unit("depth", second, weight=0.5, guidance_start=0.25, guidance_end=0.75))
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=5, control=units))
    _assert_parity(result, expected, without=pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=5, control=(first,))))
    assert "ControlNet 1: " in result.parameters[0] and "Model: depth [" in result.parameters[0]


def test_guess_mode_matches_diffusers(pipeline, control):
    reference = _reference("StableDiffusionControlNetPipeline", "tiny", _controlnet("tiny-controlnet"), pipeline.scheduler_config)
    expected = _run(reference, PROMPT, image=control, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5,
                    guess_mode=True, seed=8)
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=8, control=(_unit("canny", control, guess_mode=True),)))
    balanced = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=8, control=(_unit("canny", control),)))
    _assert_parity(result, expected, without=balanced)


def test_img2img_with_a_controlnet_matches_diffusers(pipeline, control, images):
    reference = _reference("StableDiffusionControlNetImg2ImgPipeline", "tiny", _controlnet("tiny-controlnet"), pipeline.scheduler_config)
    flipped = control.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    expected = _run(reference, PROMPT, image=Image.open(images[0]), control_image=flipped, strength=0.6, negative_prompt=NEGATIVE,
                    num_inference_steps=10, guidance_scale=7.5, controlnet_conditioning_scale=0.9, control_guidance_end=0.7, seed=21)
    request = GenerationRequest(PROMPT, NEGATIVE, steps=10, seed=21, init_image=load_init_image(images[0], SIZE, SIZE, []), strength=0.6)
    result = pipeline.generate(replace(request, control=(_unit("canny", flipped, weight=0.9, guidance_end=0.7),)))
    _assert_parity(result, expected, without=pipeline.generate(request))


def test_inpainting_with_a_controlnet_matches_diffusers(pipeline, control, images):
    reference = _reference("StableDiffusionControlNetInpaintPipeline", "tiny", _controlnet("tiny-controlnet"), pipeline.scheduler_config)
    expected = _run(reference, PROMPT, image=Image.open(images[0]), mask_image=Image.open(images[1]), control_image=control,
                    strength=0.75, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, height=SIZE, width=SIZE,
                    controlnet_conditioning_scale=1.0, seed=4)  # the inpaint pipeline's default scale is 0.5
    init, mask = load_init_image(images[0], SIZE, SIZE, []), load_mask(images[1], SIZE, SIZE, [])
    request = GenerationRequest(PROMPT, NEGATIVE, steps=10, seed=4, init_image=init, mask=mask, strength=0.75)
    result = pipeline.generate(replace(request, control=(_unit("canny", control),)))
    _assert_parity(result, expected, without=pipeline.generate(request))


def test_sdxl_controlnet_takes_the_added_conditioning_as_diffusers(sdfast_cache, tmp_path_factory, control):
    engine = _export("tiny-sdxl", tmp_path_factory.mktemp("sdxl-control"), ("tiny-sdxl-controlnet", "canny"), cpu_variant=False)
    pipeline = Pipeline.load(engine)
    reference = _reference("StableDiffusionXLControlNetPipeline", "tiny-sdxl", _controlnet("tiny-sdxl-controlnet"), pipeline.scheduler_config)
    expected = _run(reference, PROMPT, image=control, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=5.0,
                    controlnet_conditioning_scale=0.9, control_guidance_start=0.1, seed=6)
    request = GenerationRequest(PROMPT, NEGATIVE, steps=8, cfg_scale=5.0, seed=6)
    result = pipeline.generate(replace(request, control=(_unit("canny", control, weight=0.9, guidance_start=0.1),)))
    _assert_parity(result, expected, without=pipeline.generate(request))
    refused = run_cli("export-controlnet", "tiny-controlnet", "--engine", engine, "--name", "sd15net")
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and last.startswith("sdfast export-controlnet: error: ") and "another base model" in last
    assert "controlnet_sd15net" not in read_manifest(engine).components and not list(engine.glob("*sd15net*"))


def test_sd2_v_prediction_with_a_controlnet_matches_diffusers(sdfast_cache, tmp_path_factory, control):
    engine = _export("tiny-sd2", tmp_path_factory.mktemp("sd2-control"), ("tiny-sd2-controlnet", "canny"), cpu_variant=False)
    pipeline = Pipeline.load(engine)
    reference = _reference("StableDiffusionControlNetPipeline", "tiny-sd2", _controlnet("tiny-sd2-controlnet"), pipeline.scheduler_config)
    expected = _run(reference, PROMPT, image=control, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5,
                    control_guidance_end=0.75, seed=12)
    request = GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=12)
    result = pipeline.generate(replace(request, control=(_unit("canny", control, guidance_end=0.75),)))
    _assert_parity(result, expected, without=pipeline.generate(request))


def test_nine_channel_inpainting_unet_with_a_controlnet_matches_diffusers(sdfast_cache, tmp_path_factory, control, images):
    engine = _export("tiny-inpaint", tmp_path_factory.mktemp("inpaint-control"), ("tiny-controlnet", "canny"), cpu_variant=False)
    pipeline = Pipeline.load(engine)
    reference = _reference("StableDiffusionControlNetInpaintPipeline", "tiny-inpaint", _controlnet("tiny-controlnet"),
                           pipeline.scheduler_config)
    expected = _run(reference, PROMPT, image=Image.open(images[0]), mask_image=Image.open(images[1]), control_image=control,
                    strength=1.0, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, height=SIZE, width=SIZE,
                    controlnet_conditioning_scale=1.0, seed=9)
    init, mask = load_init_image(images[0], SIZE, SIZE, []), load_mask(images[1], SIZE, SIZE, [])
    request = GenerationRequest(PROMPT, NEGATIVE, steps=10, seed=9, init_image=init, mask=mask)
    result = pipeline.generate(replace(request, control=(_unit("canny", control),)))
    _assert_parity(result, expected, without=pipeline.generate(request))


def test_a1111_control_modes_scale_the_residuals_as_sd_webui_controlnet(pipeline, control):
    soft = ControlUnit("canny", np.zeros((1, 3, 2, 2), np.float32), weight=0.5, control_mode="prompt").scales(13)
    np.testing.assert_allclose(soft, [0.5 * 0.825 ** (12 - i) for i in range(13)], rtol=1e-6)
    assert ControlUnit("canny", np.zeros(1), control_mode="control").scales(10)[-1] == pytest.approx(0.825 ** 3)  # SDXL's 10
    np.testing.assert_allclose(ControlUnit("c", np.zeros(1), weight=2.0, guess_mode=True).scales(13), 2 * np.logspace(-1, 0, 13), rtol=1e-6)
    runs = {mode: pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, seed=2, control=(_unit("canny", control, control_mode=mode),)))
            for mode in ("balanced", "prompt", "control")}
    assert np.abs(runs["balanced"].latents - runs["prompt"].latents).max() > 0.05
    assert np.abs(runs["prompt"].latents - runs["control"].latents).max() > 0.05
    assert 'Control Mode: ControlNet is more important"' in runs["control"].parameters[0]


def test_bad_units_are_refused_before_anything_runs(pipeline, control):
    for unit, message in [
        (_unit("lineart", control), "unknown ControlNet 'lineart': it has canny, depth"),
        (_unit("canny", control, weight=2.5), "weight must be from 0 to 2"),
        (_unit("canny", control, weight=float("nan")), "weight must be from 0 to 2"),
        (_unit("canny", control, guidance_start=0.8, guidance_end=0.2), "is after its end"),
        (_unit("canny", control, guess_mode=True, control_mode="prompt"), "choose one"),
        (ControlUnit("canny", np.zeros((1, 3, 32, 32), np.float32)), "must be a [1, 3, 64, 64] float32 array"),
    ]:
        with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("(", r"\(")):
            pipeline.validate(GenerationRequest(PROMPT, control=(unit,)))


def test_cli_controlnet_runs_and_bad_input_is_one_line_and_exit_2(engine, control, tmp_path, sdfast_cache):
    from tests.conftest import visible_lines

    control_path = tmp_path / "control.png"
    control.save(control_path)
    out = tmp_path / "out.png"
    done = run_cli("generate", engine, PROMPT, "--steps", "3", "--control", f"canny:{control_path}:0.8:0:1", "--control", f"depth:{control_path}",
                   "--control-module", "canny:50:150", "-o", out, "--quiet")
    assert done.returncode == 0, done.stderr
    text = Image.open(out).text["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: canny [' in text and "Threshold A: 50.0" in text and "ControlNet 1: " in text
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("1", (9000, 8000)).save(tmp_path / "huge.png")  # 72 megapixels, cheap as a 1-bit image
    cases = [
        ([f"canny:{tmp_path / 'missing.png'}"], [], "control image '" + str(tmp_path / "missing.png") + "' does not exist"),
        ([f"canny:{tmp_path / 'notes.txt'}"], [], "is not a readable image"),
        ([f"canny:{tmp_path / 'huge.png'}"], [], "more than 64 megapixels"),
        ([f"lineart:{control_path}"], [], "unknown ControlNet 'lineart': it has canny, depth"),
        ([f"canny:{control_path}:3"], [], "weight must be from 0 to 2"),
        ([f"canny:{control_path}"], ["--control-module", "openpose"], "needs model weights"),
        ([f"canny:{control_path}"], ["--control-module", "edges"], "unknown preprocessor 'edges'"),
        (["canny"], [], "is not NAME:IMAGE"),
    ]
    for controls, extra, message in cases:
        bad = tmp_path / "bad.png"
        args = [item for spec in controls for item in ("--control", spec)]
        done = run_cli("generate", engine, PROMPT, "--steps", "2", *args, *extra, "-o", bad, "--quiet")
        lines = visible_lines(done.stderr)
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (message, done.stderr)
        assert not bad.exists()


def test_export_controlnet_refuses_what_does_not_fit(engine, tmp_path, sdfast_cache, control):
    plain = _export("tiny", tmp_path, cpu_variant=False, controlnet_inputs=False)
    for args, message in [
        (["tiny-controlnet", "--engine", plain], "takes no ControlNet residuals"),
        ([str(tmp_path / "nowhere"), "--engine", engine], "does not exist"),
        ([str(plain), "--engine", engine, "--name", "x"], "not a diffusers ControlNetModel folder"),
        (["tiny-controlnet", "--engine", engine, "--name", "canny"], "already has a ControlNet 'canny'; pass --force"),
        (["tiny-controlnet", "--engine", engine, "--name", "../up"], "must be 1 to 64 letters"),
        (["tiny-controlnet", "--engine", tmp_path / "none"], "does not exist"),
    ]:
        done = run_cli("export-controlnet", *args)
        assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], (message, done.stderr)
    control.save(tmp_path / "x.png")
    refused = run_cli("generate", plain, PROMPT, "--control", f"canny:{tmp_path / 'x.png'}", "-o", tmp_path / "o.png", "--quiet")
    assert refused.returncode == 2 and "takes no ControlNet residuals" in refused.stderr


def test_resize_modes_and_preprocessors_follow_a1111():
    cv2 = pytest.importorskip("cv2")
    from sdfast.runtime.control_images import fit, module_key, preprocess, resize_mode_label

    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = 255  # a white band on the left, the rest black
    wide[0, :] = wide[-1, :] = 40  # the border's median colour becomes 40
    assert fit(wide, 32, 32, "Just Resize").shape == (32, 32, 3)
    cropped = fit(wide, 32, 32, "Crop and Resize")  # the middle 32 columns: the band is cut off
    assert cropped.shape == (32, 32, 3) and cropped[8:24, :].max() == 0
    filled = fit(wide, 32, 32, "Resize and Fill")  # 64x32 -> 32x16 in the middle, 8 rows of border colour above and below
    assert filled.shape == (32, 32, 3) and (filled[:7] == 40).all() and (filled[-7:] == 40).all() and filled[16, 2].min() > 200
    assert resize_mode_label(0) == "Just Resize" and resize_mode_label("Crop and Resize") == "Crop and Resize" and resize_mode_label(2) == "Resize and Fill"
    picture = np.asarray(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None] * 4, (64, 1))).convert("RGB"))
    edges = preprocess(picture, "canny", processor_res=64, threshold_a=10, threshold_b=30)
    assert np.array_equal(edges[:, :, 1], cv2.Canny(picture, 10, 30)) and np.array_equal(preprocess(picture, "invert"), 255 - picture)
    assert preprocess(picture, "canny", processor_res=128).shape == (128, 128, 3)  # detected at the processor's resolution
    with pytest.raises(RequestError, match="needs model weights"):
        module_key("depth_midas")


def test_replacing_a_controlnet_keeps_the_engine_dir_consistent(engine, sdfast_cache):
    from sdfast.export.controlnet_export import ControlNetExportRequest, export_controlnet

    before = read_manifest(engine).data["components"]["controlnet_depth"]
    export_controlnet(ControlNetExportRequest("tiny-controlnet", engine, "depth", force=True))  # depth now holds the first net
    manifest = read_manifest(engine)
    after = manifest.data["components"]["controlnet_depth"]
    assert after["file"] != before["file"] and not (engine / before["file"]).exists()  # new names; the old files are gone
    assert after["controlnet"]["source"]["fingerprint"] == manifest.data["components"]["controlnet_canny"]["controlnet"]["source"]["fingerprint"]
    manifest.verify_files()
    assert not list(engine.glob(".controlnet_*")) and not list(engine.glob(".manifest.*.tmp"))
    export_controlnet(ControlNetExportRequest("tiny-controlnet-2", engine, "depth", force=True))  # as the other tests expect


def test_extreme_aspect_ratios_never_make_huge_images():
    from sdfast.runtime.control_images import fit, preprocess

    strip = np.full((1, 4096, 3), 200, np.uint8)  # 4096x1: "cover 64x64" would be 262144x64
    assert fit(strip, 64, 64, "Crop and Resize").shape == (64, 64, 3)
    assert fit(strip, 64, 64, "Resize and Fill").shape == (64, 64, 3)
    with pytest.raises(RequestError, match="more than 64 megapixels"):
        preprocess(strip, "canny", processor_res=512)
