"""Several image sizes in one engine dir: a static graph per size over one copy of the weights, each size's image equal
to diffusers' at that size, sizes shown and unknown sizes refused everywhere."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image

from sdfast.errors import EngineError, RequestError
from sdfast.runtime.images import init_image_array, psnr
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import diffusers_reference, run_cli, visible_lines

PROMPT, NEGATIVE, STEPS = "a red apple on a table", "blurry", 8
SIZES = [(64, 64), (96, 64), (64, 96), (128, 128)]  # (width, height), the default first (conftest's tiny_sized_engine)
LISTED = "64x64, 96x64, 64x96, 128x128"


@pytest.fixture(scope="module")
def sized_engine(tiny_sized_engine):
    return tiny_sized_engine


@pytest.fixture(scope="module")
def pipeline(sized_engine):
    return Pipeline.load(sized_engine)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return diffusers_reference(tiny_model)


def _theirs(reference, pipeline, width, height, **extra):
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    images = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=height, width=width,
                       generator=torch.Generator("cpu").manual_seed(42), output_type="np", **extra).images
    return (images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("width, height", SIZES[:3])
def test_each_size_matches_diffusers_at_that_size(pipeline, reference, width, height):
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, seed=42, width=width, height=height))
    expected = _theirs(reference, pipeline, width, height)
    assert result.images.shape == expected.shape == (1, height, width, 3)
    assert result.images.std() > 10
    assert psnr(result.images, expected) >= 40.0
    assert f"Size: {width}x{height}," in result.parameters[0]


def test_img2img_at_another_size_matches_diffusers(pipeline, tiny_model):
    y, x = np.mgrid[0:64, 0:96] / 63.0
    picture = Image.fromarray((np.stack([x / 1.5, y, 1 - x / 3], axis=-1) * 255).astype(np.uint8))
    reference = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    expected = (reference(PROMPT, image=picture, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                          generator=torch.Generator("cpu").manual_seed(42), output_type="np").images * 255).round().astype(np.uint8)
    init = init_image_array(picture, 96, 64, [])
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, seed=42, width=96, height=64,
                                                 init_image=init, strength=0.6))
    assert result.images.shape == expected.shape == (1, 64, 96, 3)
    assert psnr(result.images, expected) >= 40.0


def test_default_size_equals_a_single_size_engine(pipeline, tiny_engine):
    """Sharing the weights (memory-mapped, prepacking off) computes what the plain engine computes."""
    request = GenerationRequest(PROMPT, NEGATIVE, steps=4, cfg_scale=7.5, seed=7)
    single = Pipeline.load(tiny_engine).generate(request).images
    assert psnr(pipeline.generate(request).images, single) >= 60.0


def test_weights_are_stored_once_and_mapped_once(sized_engine, tiny_engine, pipeline):
    manifest = read_manifest(sized_engine)
    assert manifest.sizes == SIZES
    unet = manifest.data["components"]["unet"]
    assert set(unet["sizes"]) == {"96x64", "64x96", "128x128"}
    assert "sizes" not in manifest.data["components"]["text_encoder"]  # no image size in its shapes: one graph
    # every graph of the U-Net, at every size and in both variants, reads one data file
    graphs = [unet, *unet["variants"].values(), *(t for s in unet["sizes"].values() for t in (s, *s["variants"].values()))]
    assert len(graphs) == 8 and all(set(g["files"]) == {g["file"], "unet.weights"} for g in graphs)
    single = read_manifest(tiny_engine).data["components"]["unet"]
    single_bytes = sum(f["bytes"] for v in (single, single["variants"]["cpu"]) for name, f in v["files"].items() if name.endswith(".data"))
    assert unet["shared_weights"]["files"]["unet.weights"]["bytes"] < 1.1 * single_bytes  # six graphs: less than two graphs' data
    assert not list(sized_engine.glob("*.onnx.data")) or all("text_encoder" in p.name for p in sized_engine.glob("*.onnx.data"))
    # the sessions of the sizes compute from the same memory (one map of unet.weights); at 128x128 the CPU variant
    # rewrites more convolutions as Winograd (its maps reach 16x16), so those tensors are its own
    engines = [pipeline.at_size(w, h).engines["unet"] for w, h in SIZES[:3]]
    pointers = [{v.data_ptr() for v in engine.shared_weights[1:]} for engine in engines]  # [0] is the map they share
    assert all(len(p) > 50 for p in pointers)
    assert len(pointers[0] & pointers[1] & pointers[2]) > 0.9 * len(pointers[0])  # (Winograd rewrites differ by size)
    text_encoders = {id(pipeline.at_size(w, h).engines["text_encoder"]) for w, h in SIZES}
    assert len(text_encoders) == 1  # one text-encoder session for every size


def test_unknown_size_is_refused_with_the_sizes(pipeline):
    with pytest.raises(RequestError, match=r"serves 64x64, 96x64, 64x96, 128x128 \(width x height\), not 80x64"):
        pipeline.generate(GenerationRequest(PROMPT, width=80, height=64, steps=2))
    with pytest.raises(RequestError, match="not 64x80"):
        pipeline.validate(GenerationRequest(PROMPT, width=64, height=80, steps=2))


def test_cli_generates_each_size_and_refuses_others(sized_engine, tmp_path):
    out = tmp_path / "wide.png"
    completed = run_cli("generate", sized_engine, PROMPT, "--width", "96", "--height", "64", "--steps", "2", "-o", out)
    assert completed.returncode == 0, completed.stderr
    with Image.open(out) as image:
        assert image.size == (96, 64)
        assert "Size: 96x64" in image.info["parameters"]
    completed = run_cli("generate", sized_engine, PROMPT, "--width", "128", "--steps", "2", "-o", tmp_path / "no.png")
    assert completed.returncode == 2
    lines = visible_lines(completed.stderr)
    assert len(lines) == 1 and "serves 64x64, 96x64, 64x96, 128x128 (width x height), not 128x64" in lines[0], completed.stderr
    assert not (tmp_path / "no.png").exists()
    info = run_cli("info", sized_engine)
    assert info.returncode == 0 and f"{LISTED} (the first is the default)" in info.stdout
    assert "at 96x64" in info.stdout and "unet.weights" in info.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--size", "100x64"], "--size 100x64: width 100 is not a positive multiple of 8"),
    (["--size", "big"], "--size 'big' is not WIDTHxHEIGHT"),
])
def test_export_refuses_bad_sizes_in_one_line(tmp_path, args, fragment):
    completed = run_cli("export", "--model", "tiny", "--out", tmp_path / "e", *args)
    assert completed.returncode == 2
    lines = visible_lines(completed.stderr)
    assert len(lines) == 1 and fragment in lines[0], completed.stderr
    assert not (tmp_path / "e").exists()


def test_a_missing_size_entry_is_a_malformed_manifest(sized_engine, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sized_engine, copy)
    data = json.loads((copy / "manifest.json").read_text())
    del data["components"]["vae_decoder"]["sizes"]["64x96"]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match="vae_decoder.*not the engine dir's other sizes"):
        read_manifest(copy)


@pytest.mark.parametrize("change, message", [
    (lambda unet: unet["sizes"]["96x64"].update(role="vae_decoder"), "only file, files, flops, inputs, outputs, parity, variants may differ by size"),
    (lambda unet: unet["sizes"]["96x64"]["inputs"][0].update(shape=[2, "wide"]), "at 96x64: tensor 'sample' needs a name, a shape"),
    (lambda unet: unet["shared_weights"]["files"].pop("unet.weights"), "shared weights and their index must be among its hashed files"),
])
def test_malformed_size_entries_are_refused_in_one_line(sized_engine, tmp_path, change, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sized_engine, copy, ignore=shutil.ignore_patterns("*.weights", "*.data"))
    data = json.loads((copy / "manifest.json").read_text())
    change(data["components"]["unet"])
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError) as raised:
        read_manifest(copy)
    assert "malformed" in str(raised.value) and message in str(raised.value) and "\n" not in str(raised.value)


def test_a_corrupt_shared_weights_file_is_refused_before_loading(sized_engine, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sized_engine, copy)
    with open(copy / "unet.weights", "r+b") as handle:
        handle.seek(5000)
        handle.write(b"\x7f" * 16)
    with pytest.raises(EngineError, match="unet.weights' does not match its sha256"):
        Pipeline.load(copy)


def test_lora_at_another_size_matches_diffusers_fuse_lora(pipeline, tiny_model, tmp_path_factory):
    """The parameter map covers every size's graphs: a LoRA lands in the 96x64 U-Net's Winograd/NCHWc weights too."""
    pytest.importorskip("peft")
    from sdfast.runtime.lora.library import LoraLibrary
    from sdfast.runtime.lora.prompt_tags import LoraUse
    from tests.lora_files import kohya_lora

    folder = tmp_path_factory.mktemp("size-loras")
    kohya_lora(diffusers_reference(tiny_model), folder / "ink.safetensors", seed=4)
    pipeline.loras.library = LoraLibrary(folder)
    try:
        result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, seed=42, width=96, height=64,
                                                     loras=(LoraUse("ink", 0.8, 0.8),)))
        reference = diffusers_reference(tiny_model)
        reference.load_lora_weights(str(folder), weight_name="ink.safetensors", adapter_name="ink")
        reference.set_adapters(["ink"], adapter_weights=[0.8])
        reference.fuse_lora(adapter_names=["ink"], lora_scale=1.0)
        expected = _theirs(reference, pipeline, 96, 64)
        assert psnr(result.images, expected) >= 40.0
        assert psnr(result.images, _theirs(diffusers_reference(tiny_model), pipeline, 96, 64)) < 35  # the LoRA changed it
        assert "Lora hashes:" in result.parameters[0]
    finally:
        pipeline.at_size(96, 64).loras.apply([])  # back to the stored weights for the other tests
        pipeline.loras.library = LoraLibrary(None)


def test_serve_answers_each_size_and_refuses_others_naming_the_field(sized_engine):
    webuiapi = pytest.importorskip("webuiapi")
    import httpx

    from tests.test_serve import Server

    server = Server(sized_engine)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        for width, height in SIZES:
            result = api.txt2img(prompt=PROMPT, seed=3, steps=2, width=width, height=height, sampler_name="Euler")
            assert result.image.size == (width, height)
            assert result.info["width"] == width and result.info["height"] == height
        refused = httpx.post(f"{api.baseurl}/txt2img", json={"prompt": PROMPT, "width": 128, "height": 64, "steps": 2}, timeout=60)
        assert refused.status_code == 422
        assert "width" in refused.text and LISTED in refused.text
        refused = httpx.post(f"{api.baseurl}/txt2img", json={"prompt": PROMPT, "width": 96, "height": 96, "steps": 2}, timeout=60)
        assert refused.status_code == 422 and "height" in refused.text
        models = httpx.get(f"{api.baseurl}/sd-models", timeout=60).json()
        assert models[0]["sizes"] == LISTED.split(", ")
        base = f"http://127.0.0.1:{server.port}"
        openai = httpx.post(f"{base}/v1/images/generations", json={"prompt": PROMPT, "size": "64x96", "response_format": "b64_json"},
                            timeout=120)
        assert openai.status_code == 200, openai.text
        refused = httpx.post(f"{base}/v1/images/generations", json={"prompt": PROMPT, "size": "256x256"}, timeout=60)
        assert refused.status_code in (400, 422) and "size" in refused.text
        assert httpx.get(f"{base}/ready", timeout=60).json()["sizes"] == LISTED.split(", ")
    finally:
        assert server.stop()


def test_controlnets_added_later_run_at_the_default_size(sized_engine, tmp_path):
    """export-controlnet writes a ControlNet at the default size; a control request at another size is refused clearly."""
    import shutil

    from sdfast.export.controlnet_export import ControlNetExportRequest, export_controlnet
    from sdfast.runtime.control import ControlUnit

    copy = tmp_path / "with-controlnet"
    shutil.copytree(sized_engine, copy)
    export_controlnet(ControlNetExportRequest("tiny-controlnet", copy, "canny"))
    assert read_manifest(copy).sizes == SIZES  # the sizes survive the manifest's rewrite
    pipe = Pipeline.load(copy, verify="size")
    unit = ControlUnit("canny", np.full((1, 3, 64, 64), 0.5, dtype=np.float32))
    assert pipe.generate(GenerationRequest(PROMPT, steps=2, control=(unit,))).images.shape == (1, 64, 64, 3)
    wide = ControlUnit("canny", np.full((1, 3, 64, 96), 0.5, dtype=np.float32))
    with pytest.raises(RequestError, match="ControlNets run at the engine dir's default size 64x64 only"):
        pipe.generate(GenerationRequest(PROMPT, steps=2, width=96, height=64, control=(wide,)))
    assert pipe.at_size(96, 64).generate(GenerationRequest(PROMPT, steps=2, width=96, height=64)).images.shape == (1, 64, 96, 3)


def _two_sizes_match(model: str, tmp_path_factory, reference, cfg: float) -> None:
    """``model`` exported at 64x64 and 96x64: each size's image equals ``reference``'s at that size (PSNR >= 40 dB)."""
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("engines") / f"{model}-sizes"
    pipe = Pipeline.load(export_engine(ExportRequest(model=model, out=out, height=64, width=64, sizes=((96, 64),))))
    reference.set_progress_bar_config(disable=True)
    for width, height in ((96, 64), (64, 64)):
        expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=cfg, height=height, width=width,
                             generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
        result = pipe.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=cfg, seed=7, width=width, height=height))
        assert result.images.shape == (1, height, width, 3)
        assert psnr(result.images, (expected * 255).round().astype(np.uint8)) >= 40.0, (width, height)


def test_sdxl_sizes_match_diffusers_at_each_size(tmp_path_factory):
    """SDXL's added conditioning (time_ids: original and target size) follows the request's size."""
    from sdfast.export.builtin import ensure_builtin

    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(ensure_builtin("tiny-sdxl"), add_watermarker=False)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    _two_sizes_match("tiny-sdxl", tmp_path_factory, reference, 7.5)


def test_sd3_sizes_match_diffusers_at_each_size(tmp_path_factory):
    """SD3's transformer at two sizes (multiples of 16); the flow schedule's shift follows each size's latent cells."""
    from sdfast.export.builtin import SD3_SCHEDULER_CONFIG, ensure_builtin

    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(
        ensure_builtin("tiny-sd3"), text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)
    reference.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    _two_sizes_match("tiny-sd3", tmp_path_factory, reference, 5.0)
