"""A1111's ControlNet API (sd-webui-controlnet's, as webuiapi's ControlNetUnit sends it) over real HTTP on loopback."""
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from sdfast.runtime.control import ControlUnit
from sdfast.runtime.control_images import control_array, rgb_pixels
from sdfast.runtime.images import init_image_array
from sdfast.runtime.pipeline import GenerationRequest, Pipeline

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from tests.test_serve import Server  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn"


@pytest.fixture(scope="module")
def engine(sdfast_cache, tmp_path_factory):
    from sdfast.export.build import ExportRequest, export_engine
    from sdfast.export.controlnet_export import ControlNetExportRequest, export_controlnet

    engine = export_engine(ExportRequest(model="tiny", out=tmp_path_factory.mktemp("serve-control") / "tiny", cpu_variant=False))
    export_controlnet(ControlNetExportRequest("tiny-controlnet", engine, "canny"))
    return engine


@pytest.fixture(scope="module")
def server(engine):
    running = Server(engine, "--preload-controlnets")
    yield running
    assert running.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


@pytest.fixture(scope="module")
def pipeline(engine):
    return Pipeline.load(engine, verify="size")


@pytest.fixture(scope="module")
def control(images):
    return Image.open(images[0]).convert("RGB")


def _decoded(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_model_module_lists_and_version(api, server, pipeline):
    titles = api.controlnet_model_list()
    assert titles == [f"canny [{pipeline.controlnets.model_hash('canny')}]"]
    assert api.controlnet_module_list() == ["none", "canny", "invert"]
    assert httpx.get(f"{server.url}/controlnet/version").json() == {"version": 2}


def test_txt2img_with_a_unit_is_the_pipelines_image(api, pipeline, control):
    title = api.controlnet_model_list()[0]
    unit = webuiapi.ControlNetUnit(image=control, module="none", model=title, weight=0.8, guidance_start=0.1, guidance_end=0.9,
                                   control_mode=0, resize_mode="Just Resize")
    result = api.txt2img(prompt=PROMPT, width=64, height=64, negative_prompt="blurry", seed=11, steps=6, cfg_scale=7.5, sampler_name="Euler",
                         controlnet_units=[unit], alwayson_scripts={})
    expected = pipeline.generate(GenerationRequest(PROMPT, "blurry", steps=6, cfg_scale=7.5, seed=11, sampler="Euler", control=(
        ControlUnit("canny", control_array(rgb_pixels(control)), 0.8, 0.1, 0.9, "balanced", a1111_window=True),)))
    assert np.array_equal(_decoded(result.image), expected.images[0])
    infotext = result.info["infotexts"][0]
    assert f'ControlNet 0: "Module: none, Model: {title}, Weight: 0.8, Resize Mode: Just Resize' in infotext
    assert "Control Mode: Balanced" in infotext
    # webuiapi writes the units into its *default* alwayson_scripts dict, so every later call in this process (other test
    # modules' too) would resend them: each call here passes a fresh one
    plain = api.txt2img(prompt=PROMPT, width=64, height=64, negative_prompt="blurry", seed=11, steps=6, cfg_scale=7.5, sampler_name="Euler",
                        alwayson_scripts={})
    assert not np.array_equal(_decoded(plain.image), _decoded(result.image))
    diffusers_window = pipeline.generate(GenerationRequest(PROMPT, "blurry", steps=6, cfg_scale=7.5, seed=11, sampler="Euler", control=(
        ControlUnit("canny", control_array(rgb_pixels(control)), 0.8, 0.1, 0.9, "balanced"),)))
    assert not np.array_equal(diffusers_window.images[0], expected.images[0])  # A1111's window keeps step 5 of 6 (5/6 <= 0.9)


def test_canny_units_and_detect_run_opencv(api, server, pipeline, control):
    title = api.controlnet_model_list()[0]
    detected = api.controlnet_detect([control], module="canny", processor_res=64, threshold_a=50, threshold_b=120)
    edges = np.asarray(detected.images[0].convert("RGB"))  # webuiapi decodes the returned images
    expected = cv2.Canny(np.asarray(control), 50, 120)
    assert edges.shape == (64, 64, 3) and np.array_equal(edges[:, :, 0], expected) and 0 < (expected > 0).mean() < 0.5
    unit = webuiapi.ControlNetUnit(image=control, module="canny", model=title, processor_res=64, threshold_a=50, threshold_b=120,
                                   control_mode=2)
    result = api.txt2img(prompt=PROMPT, width=64, height=64, seed=3, steps=4, sampler_name="Euler", controlnet_units=[unit], alwayson_scripts={})
    local = pipeline.generate(GenerationRequest(PROMPT, steps=4, cfg_scale=7.0, seed=3, sampler="Euler", control=(
        ControlUnit("canny", control_array(np.repeat(expected[:, :, None], 3, axis=2)), control_mode="control"),)))
    assert np.array_equal(_decoded(result.image), local.images[0])
    infotext = result.info["infotexts"][0]
    assert "Module: canny" in infotext and "Threshold A: 50.0, Threshold B: 120.0" in infotext
    assert 'Control Mode: ControlNet is more important"' in infotext


def test_img2img_unit_without_an_image_takes_the_init_image(api, pipeline, control, images):
    init = Image.open(images[0])
    unit = webuiapi.ControlNetUnit(module="invert", model="canny", resize_mode="Crop and Resize")
    result = api.img2img(images=[init], prompt=PROMPT, width=64, height=64, seed=5, steps=6, denoising_strength=0.6, sampler_name="Euler", cfg_scale=7.0,
                         controlnet_units=[unit], alwayson_scripts={})
    expected = pipeline.generate(GenerationRequest(PROMPT, steps=6, cfg_scale=7.0, seed=5, sampler="Euler", strength=0.6,
                                                   init_image=init_image_array(init, 64, 64, []), control=(
        ControlUnit("canny", control_array(255 - rgb_pixels(init))),)))
    assert np.array_equal(_decoded(result.image), expected.images[0])


def _unit_payload(control, **fields) -> dict:
    buffer = io.BytesIO()
    control.save(buffer, format="PNG")
    unit = {"image": base64.b64encode(buffer.getvalue()).decode(), "module": "none", "model": "canny", **fields}
    return {"prompt": PROMPT, "steps": 2, "alwayson_scripts": {"controlnet": {"args": [unit]}}}


@pytest.mark.parametrize("fields, field, words", [
    ({"model": "control_v11p_sd15_lineart [43d4be0d]"}, "args[0].model", "unknown ControlNet"),
    ({"model": "None"}, "args[0].model", "name the ControlNet"),
    ({"module": "openpose_full"}, "args[0].module", "needs model weights"),
    ({"module": "fancy_edges"}, "args[0].module", "unknown preprocessor"),
    ({"weight": 5}, "args[0].weight", "from 0 to 2"),
    ({"guidance_start": 0.9, "guidance_end": 0.1}, "args[0].guidance_start", "after"),
    ({"control_mode": "Louder"}, "args[0].control_mode", "not one of"),
    ({"resize_mode": "Stretch"}, "args[0].resize_mode", "not one of"),
    ({"image": "bm90IGFuIGltYWdl"}, "args[0].image", "not a readable image"),
    ({"advanced_weighting": [1.0] * 13}, "args[0].advanced_weighting", "not supported by sdfast"),
    ({"pixel_perfect": "false"}, "args[0].pixel_perfect", "true or false"),
    ({"sharpness": 3}, "args[0].sharpness", "not a ControlNet unit field"),
])
def test_bad_units_get_422_naming_the_field(server, control, fields, field, words):
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=_unit_payload(control, **fields), timeout=60)
    assert response.status_code == 422, response.text
    assert f"alwayson_scripts.controlnet.{field}" in response.text and words in response.text


def test_other_extensions_are_still_refused_and_no_image_is_refused(server, control):
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "alwayson_scripts": {"ADetailer": {"args": []}}})
    assert response.status_code == 422 and "ADetailer" in response.text
    payload = _unit_payload(control)
    del payload["alwayson_scripts"]["controlnet"]["args"][0]["image"]
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 422 and "alwayson_scripts.controlnet.args[0].image" in response.text
    assert httpx.post(f"{server.url}/controlnet/detect", json={"controlnet_module": "openpose", "controlnet_input_images": []}).status_code == 422


def test_a_corrupt_controlnet_fails_a_preloading_start_in_one_line(engine, tmp_path):
    import shutil

    from sdfast.runtime.manifest import read_manifest

    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    graph = copy / read_manifest(copy).components["controlnet_canny"].file
    graph.write_bytes(graph.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="server exited") as failed:
        Server(copy, "--preload-controlnets")
    assert "sdfast serve: error: " in str(failed.value) and "controlnet_canny" in str(failed.value) and "Traceback" not in str(failed.value)


def test_webuiapi_defaults_stay_clean():
    """The calls above pass alwayson_scripts={}: webuiapi's shared default dict must not carry their units into later
    tests (or a user's later calls)."""
    import inspect

    for method in (webuiapi.WebUIApi.txt2img, webuiapi.WebUIApi.img2img):
        assert inspect.signature(method).parameters["alwayson_scripts"].default == {}
