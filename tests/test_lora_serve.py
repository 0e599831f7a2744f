"""LoRAs through A1111's API: <lora:name:weight> in the prompt, /sdapi/v1/loras, over real HTTP with webuiapi."""
import concurrent.futures

import httpx
import numpy as np
import pytest

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("torch")
pytest.importorskip("peft")

from sdfast.runtime.images import psnr
from sdfast.runtime.lora.library import LoraLibrary
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import diffusers_reference
from tests.lora_files import kohya_lora, peft_lora
from tests.test_serve import Server  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn"


@pytest.fixture(scope="module")
def engine(sdfast_cache, tmp_path_factory):
    """The portable graphs only: LoRAs patch their transposed MatMul weights (test_lora covers the CPU variant's)."""
    from sdfast.export.build import ExportRequest, export_engine

    return export_engine(ExportRequest(model="tiny", out=tmp_path_factory.mktemp("serve-lora") / "tiny", cpu_variant=False))


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-loras")
    reference = diffusers_reference(tiny_model)
    kohya_lora(reference, folder / "ink.safetensors", seed=11)
    peft_lora(reference, folder, "watercolor", seed=12)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return folder


@pytest.fixture(scope="module")
def server(engine, lora_dir):
    running = Server(engine, "--lora-dir", str(lora_dir))
    yield running
    assert running.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


@pytest.fixture(scope="module")
def local(engine, lora_dir):
    pipe = Pipeline.load(engine, verify="size")
    pipe.loras.library = LoraLibrary(lora_dir)
    return pipe


def _txt2img(api, prompt):
    return api.txt2img(prompt=prompt, negative_prompt="blurry", seed=5, steps=4, width=64, height=64, sampler_name="Euler")


def _local(local, prompt):
    return local.generate(GenerationRequest(prompt, "blurry", steps=4, seed=5, sampler="euler", cfg_scale=7.0)).images[0]


def test_loras_are_listed_as_a1111_lists_them(api, lora_dir):
    listed = {entry["name"]: entry for entry in api.get_loras()}
    assert set(listed) == {"ink", "watercolor", "broken"}
    assert listed["ink"]["alias"] == "ink" and listed["ink"]["path"] == str(lora_dir / "ink.safetensors")
    assert listed["ink"]["metadata"]["ss_network_module"] == "networks.lora" and listed["broken"]["metadata"] == {}
    assert httpx.post(f"{api.baseurl}/refresh-loras").status_code == 200


def test_prompt_tags_apply_loras_as_the_pipeline_does(api, local):
    plain = _txt2img(api, PROMPT)
    for tag in ("<lora:ink:0.8>", "<lora:watercolor:-0.5> <lora:ink:0.3>"):
        result = _txt2img(api, f"{PROMPT} {tag}")
        assert psnr(np.asarray(result.image)[None], _local(local, f"{PROMPT} {tag}")[None]) >= 40
        assert psnr(np.asarray(result.image)[None], np.asarray(plain.image)[None]) < 35
        infotext = result.info["infotexts"][0]
        assert infotext.startswith(f"{PROMPT} {tag}") and 'Lora hashes: "' in infotext
    again = _txt2img(api, PROMPT)
    assert again.json["images"][0] == plain.json["images"][0]  # without tags, the stored weights again


def test_concurrent_requests_with_other_loras_are_not_batched_together(api, server):
    prompts = [f"{PROMPT} <lora:ink:0.8>", f"{PROMPT} <lora:watercolor:0.8>", PROMPT, f"{PROMPT} <lora:ink:0.8>"]
    alone = [_txt2img(api, prompt).json["images"][0] for prompt in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda prompt: _txt2img(api, prompt).json["images"][0], prompts))
    assert together == alone


@pytest.mark.parametrize("prompt, message", [
    (f"{PROMPT} <lora:nowhere:1>", "unknown LoRA 'nowhere'"),
    (f"{PROMPT} <lora:broken:1>", "not a safetensors file"),
    (f"{PROMPT} <lora:ink:99>", "outside -10 .. 10"),
    (f"{PROMPT} <lora:/etc/passwd:1>", "not a path"),
])
def test_bad_loras_get_a_422_naming_the_prompt(api, prompt, message):
    response = httpx.post(f"{api.baseurl}/txt2img", json={"prompt": prompt, "steps": 2, "width": 64, "height": 64}, timeout=60)
    assert response.status_code == 422, response.text
    body = response.json()
    assert "prompt" in str(body) and message in str(body), body
