"""sdfast serve over real HTTP on loopback, driven by the clients people use: webuiapi (A1111) and openai."""
import asyncio
import base64
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from sdfast.runtime.request_check import MAX_STEPS
from sdfast.serve.worker import Cancelled, Worker
from tests.conftest import run_cli

webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")

API_KEY = "test-key-123456"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, engine: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"sdfast-serve-{self.port}.log", "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "sdfast", "serve", str(engine), "--port", str(self.port), "--verify", "size", *args],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> bool:
        """SIGTERM, then True if the server shut down gracefully (uvicorn re-raises the signal once it is done)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
            return code in (0, -signal.SIGTERM) and "sdfast serve: stopped" in self.output()
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def server(tiny_engine):
    running = Server(tiny_engine)
    yield running
    assert running.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_txt2img_same_seed_same_bytes_and_a_different_seed_differs(server, api):
    first = api.txt2img(prompt="a red bicycle", negative_prompt="blurry", seed=1234, steps=4, width=64, height=64, sampler_name="Euler a")
    again = api.txt2img(prompt="a red bicycle", negative_prompt="blurry", seed=1234, steps=4, width=64, height=64, sampler_name="Euler a")
    other = api.txt2img(prompt="a red bicycle", negative_prompt="blurry", seed=1235, steps=4, width=64, height=64, sampler_name="Euler a")
    assert first.json["images"][0] == again.json["images"][0]  # byte-identical PNGs
    assert first.json["images"][0] != other.json["images"][0]
    assert first.image.size == (64, 64) and np.asarray(first.image).std() > 0
    assert first.info["seed"] == 1234 and first.info["all_seeds"] == [1234]
    assert "Seed: 1234" in first.info["infotexts"][0] and "Sampler: Euler a" in first.info["infotexts"][0]
    assert first.image.info.get("parameters") == first.info["infotexts"][0]  # the PNG carries its infotext
    assert first.parameters["prompt"] == "a red bicycle"


def test_seed_minus_one_picks_a_seed_and_reports_it(api):
    result = api.txt2img(prompt="x", seed=-1, steps=2, width=64, height=64)
    assert 0 <= result.info["seed"] < 2**32


def test_batch_and_clip_skip_through_override_settings(api):
    result = api.txt2img(prompt="x", seed=7, steps=2, width=64, height=64, batch_size=2, n_iter=2,
                         override_settings={"CLIP_stop_at_last_layers": 2})
    assert len(result.images) == 4 and result.info["all_seeds"] == [7, 8, 9, 10] and result.info["clip_skip"] == 2
    assert "Clip skip: 2" in result.info["infotexts"][0]


def test_img2img(api):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    result = api.img2img(images=[source], prompt="a painting", seed=3, steps=4, denoising_strength=0.5, width=64, height=64)
    assert result.image.size == (64, 64) and "Denoising strength: 0.5" in result.info["infotexts"][0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = api.img2img(images=[source], mask_image=mask, prompt="a painting", seed=3, steps=4, denoising_strength=0.75,
                            width=64, height=64)
    unmasked = api.img2img(images=[source], prompt="a painting", seed=3, steps=4, denoising_strength=0.75, width=64, height=64)
    assert inpainted.image.size == (64, 64)
    assert not np.array_equal(np.asarray(inpainted.image), np.asarray(unmasked.image)), "the mask was ignored"


def test_omitted_size_means_the_engines_size(server):
    """No width/height (A1111) or size (OpenAI): the engine's 64x64, never a default the client did not send."""
    plain = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 5}, timeout=60)
    assert plain.status_code == 200, plain.text
    assert Image.open(io.BytesIO(base64.b64decode(plain.json()["images"][0]))).size == (64, 64)
    info = json.loads(plain.json()["info"])
    assert (info["width"], info["height"]) == (64, 64) and "Size: 64x64" in info["infotexts"][0]
    assert (plain.json()["parameters"]["width"], plain.json()["parameters"]["height"]) == (64, 64)
    source = base64.b64encode(_png(Image.new("RGB", (96, 80), "gray"))).decode()
    img2img = httpx.post(f"{server.url}/sdapi/v1/img2img", json={"prompt": "x", "steps": 4, "init_images": [source]}, timeout=60)
    assert img2img.status_code == 200 and Image.open(io.BytesIO(base64.b64decode(img2img.json()["images"][0]))).size == (64, 64)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    (item,) = client.images.generate(prompt="x", n=1).data
    assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (64, 64)


def test_samplers_models_options(api, server):
    names = {s["name"] for s in api.get_samplers()}
    assert {"Euler", "Euler a", "DPM++ 2M Karras", "DDIM", "UniPC", "LMS"} <= names
    (model,) = api.get_sd_models()
    assert model["model_name"] == "tiny" and model["title"] in api.util_get_model_names()
    assert "/" not in model["filename"]  # no server path leaks
    options = api.get_options()
    assert options["CLIP_stop_at_last_layers"] == 1
    assert api.set_options({"CLIP_stop_at_last_layers": 2}) is True
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    api.set_options({"CLIP_stop_at_last_layers": 1})
    assert httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 422


def test_openai_images_generate(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    result = client.images.generate(model="sdfast", prompt="a lighthouse", n=2, size="64x64", response_format="b64_json")
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert len(images) == 2 and all(i.size == (64, 64) for i in images)
    assert np.abs(np.asarray(images[0], dtype=int) - np.asarray(images[1])).max() > 0  # two seeds
    by_url = client.images.generate(model="sdfast", prompt="a lighthouse", n=1, size="64x64", response_format="url")
    fetched = httpx.get(by_url.data[0].url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    assert httpx.get(f"{server.url}/v1/images/files/nope.png").status_code == 404
    with pytest.raises(openai.APIStatusError) as refused:  # 4xx the client understands
        client.images.generate(model="sdfast", prompt="x", size="1024x1024")
    assert refused.value.status_code == 422


def test_openai_models_list_and_retrieve(server):
    """GET /v1/models lists the loaded model as OpenAI does; an unknown id is OpenAI's 404 model_not_found."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "sdfast")
    assert abs(model.created - time.time()) < 7 * 86400  # the engine's export time (exported by this test session)
    assert client.models.retrieve("tiny") == model
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("dall-e-3")
    assert missing.value.code == "model_not_found" and missing.value.body["param"] == "model" and "dall-e-3" in missing.value.message


BAD_A1111 = [
    ({"steps": 0}, "steps"), ({"steps": 100000}, "steps"), ({"width": 60}, "width"), ({"width": 128}, "width"),
    ({"height": 72}, "height"), ({"sampler_name": "Euler z"}, "sampler_name"), ({"prompt": "p" * 20001}, "prompt"),
    ({"batch_size": 64}, "batch_size"), ({"n_iter": 64}, "n_iter"), ({"batch_size": 8, "n_iter": 8}, "batch_size"),
    ({"seed": "one"}, "seed"), ({"cfg_scale": "NaN"}, "cfg_scale"), ({"enable_hr": True}, "hr_scale"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 40}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"eta": 0.3, "sampler_name": "Euler"}, "eta"), ({"scheduler": "polyexponential"}, "scheduler"),
    # A1111 fields and extensions that would change the image: refused, never run without effect
    ({"alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt"}]}}}, "alwayson_scripts"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "module": "canny"}]}}}, "alwayson_scripts.controlnet.args[0].model"),
    ({"refiner_checkpoint": "sd_xl_refiner_1.0", "refiner_switch_at": 0.8}, "refiner_checkpoint"),
    ({"s_churn": 0.5}, "s_churn"), ({"s_noise": 1.003}, "s_noise"), ({"s_tmin": 0.1}, "s_tmin"), ({"s_tmax": 10}, "s_tmax"),
    ({"seed_resize_from_w": 128, "seed_resize_from_h": 128}, "seed_resize_from_w"),
    ({"override_settings": {"sd_model_checkpoint": "v1-5-pruned"}}, "override_settings.sd_model_checkpoint"),
    ({"override_settings": {"sd_vae": "kl-f8-anime2.ckpt"}}, "override_settings.sd_vae"),
    ({"override_settings": {"eta_noise_seed_delta": 31337}}, "override_settings.eta_noise_seed_delta"),
]


@pytest.mark.parametrize("change,field", BAD_A1111)
def test_bad_txt2img_fields_get_422_naming_the_field(server, change, field):
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64, **change})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


def test_one_step_limit_for_the_cli_and_both_apis_and_plain_messages(server, tiny_engine):
    """The CLI, the Python API and HTTP read the runtime's MAX_STEPS; Pydantic's 'Value error, ' never reaches a client."""
    body = {"prompt": "x", "width": 64, "height": 64}
    past_the_slider = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "steps": 151}, timeout=120)  # A1111's UI stops at 150
    assert past_the_slider.status_code == 200
    over = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "steps": MAX_STEPS + 1})
    assert over.status_code == 422 and over.json()["field"] == "steps" and str(MAX_STEPS) in over.json()["error"]
    cli = run_cli("generate", tiny_engine, "x", "--steps", str(MAX_STEPS + 1), "--output", str(tiny_engine.parent / "never-written.png"),
                  "--verify", "size")
    assert cli.returncode == 2 and f"from 1 to {MAX_STEPS}" in cli.stderr, cli.stderr
    width = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "width": 60}).json()
    assert width == {"error": "width: must be a multiple of 8 (Stable Diffusion works on 8x8 latent cells), not 60", "field": "width"}


def test_a1111_fields_at_their_off_values_are_accepted(server):
    """What webuiapi and A1111's UI send when a feature is off (alwayson_scripts {}, s_noise 1, ...) still generates."""
    body = {"prompt": "x", "steps": 2, "alwayson_scripts": {}, "s_churn": 0, "s_tmin": 0, "s_tmax": 0, "s_noise": 1, "script_args": [],
            "refiner_checkpoint": None, "refiner_switch_at": 0.8, "seed_resize_from_w": 64, "seed_resize_from_h": 64, "enable_hr": False,
            "hr_scale": 2, "hr_upscaler": "Latent", "override_settings": {"sd_vae": "Automatic", "sd_model_checkpoint": "tiny"}}
    assert httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60).status_code == 200
    source = base64.b64encode(_png(Image.new("RGB", (64, 64), "gray"))).decode()
    base = {"prompt": "x", "steps": 4, "init_images": [source]}
    for change, field in (({"resize_mode": 2}, "resize_mode"), ({"initial_noise_multiplier": 0.9}, "initial_noise_multiplier")):
        refused = httpx.post(f"{server.url}/sdapi/v1/img2img", json={**base, **change})
        assert refused.status_code == 422 and refused.json()["field"] == field, refused.text
    off = httpx.post(f"{server.url}/sdapi/v1/img2img", json={**base, "resize_mode": 0, "initial_noise_multiplier": 1}, timeout=60)
    assert off.status_code == 200
    for option in ({"sd_vae": "kl-f8-anime2.ckpt"}, {"eta_noise_seed_delta": 31337}):
        refused = httpx.post(f"{server.url}/sdapi/v1/options", json=option)
        assert refused.status_code == 422 and refused.json()["field"] == next(iter(option)), refused.text


def test_malformed_bodies_and_images_are_4xx_and_the_server_stays_up(server):
    post = lambda path, **kw: httpx.post(f"{server.url}{path}", timeout=30, **kw)  # noqa: E731
    assert post("/sdapi/v1/txt2img", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
    assert post("/sdapi/v1/txt2img", content=b"[1, 2]", headers={"content-type": "application/json"}).status_code == 422
    base = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    bad_b64 = post("/sdapi/v1/img2img", json={**base, "init_images": ["***"]})
    assert bad_b64.status_code == 422 and bad_b64.json()["field"] == "init_images"
    not_image = post("/sdapi/v1/img2img", json={**base, "init_images": [base64.b64encode(b"plain text").decode()]})
    assert not_image.status_code == 422 and "readable image" in not_image.json()["error"]
    good = base64.b64encode(_png(Image.new("RGB", (64, 64), "white"))).decode()
    bad_mask = post("/sdapi/v1/img2img", json={**base, "init_images": [good], "mask": "data:image/png;base64,@@"})
    assert bad_mask.status_code == 422 and bad_mask.json()["field"] == "mask"
    assert post("/sdapi/v1/img2img", json=base).json()["field"] == "init_images"
    assert post("/sdapi/v1/txt2img", content=b" " * (49 << 20), headers={"content-type": "application/json"}).status_code == 413
    openai_error = lambda body: post("/v1/images/generations", json=body).json()["error"]  # noqa: E731 - OpenAI's error shape
    assert openai_error({"prompt": "x", "n": 11})["param"] == "n"
    assert openai_error({"prompt": "x", "size": "big"})["param"] == "size"
    assert openai_error({"n": 1})["param"] == "prompt"
    assert openai_error({"prompt": "x", "response_format": "file:///etc/passwd"})["type"] == "invalid_request_error"
    chunks = iter([b" " * (1 << 20)] * 48 + [b" "])  # no Content-Length: refused while streaming, at the limit's last byte
    streamed = post("/sdapi/v1/options", content=chunks, headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["field"] == "body"
    assert post("/sdapi/v1/options", content=b"[" * 200000 + b"]" * 200000).status_code == 400
    huge = Image.new("L", (5000, 5000))
    big = post("/sdapi/v1/img2img", json={**base, "init_images": [base64.b64encode(_png(huge)).decode()]})
    assert big.status_code == 413 and big.json()["field"] == "init_images"
    assert post("/sdapi/v1/txt2img", content=json.dumps({**base, "seed": 5}).encode()).status_code == 200  # no Content-Type, as A1111
    assert post("/sdapi/v1/txt2img", json={**base, "prompt": None, "sampler_name": None, "seed": None}).status_code == 200  # null = default
    late = post("/sdapi/v1/img2img", json={**base, "init_images": [good], "denoising_strength": 0.01})
    assert late.status_code == 422 and late.json()["field"] == "denoising_strength"
    assert httpx.get(f"{server.url}/nowhere").json() == {"error": "Not Found"}
    assert post("/sdapi/v1/txt2img", json={**base, "init_images": ["/etc/passwd"]}).status_code == 200  # ignored: txt2img has no init image
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_a_body_refused_while_streaming_gets_the_whole_413(server):
    """No Content-Length, chunks past the limit: the 413 arrives complete (headers and its JSON body), not cut off."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(b"POST /sdapi/v1/options HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
        reply = b""
        for _ in range(60):  # 60 MiB at most; stop sending once the server has answered
            if select.select([connection], [], [], 0)[0]:
                break
            try:
                connection.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        while True:
            try:
                data = connection.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            reply += data
            head, _, body = reply.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                break
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body) == {"error": "request body over 48 MiB", "field": "body"}


def test_eight_concurrent_requests_all_succeed(server):
    def one(seed):
        return httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "seed": seed, "steps": 3, "width": 64, "height": 64}, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert [json.loads(r.json()["info"])["seed"] for r in responses] == list(range(8))
    assert len({r.json()["images"][0] for r in responses}) == 8


def _wait_for_sampling(api, after_job: str = "") -> dict:
    """/sdapi/v1/progress once a job other than ``after_job`` has run a step (within 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 0 and progress["state"]["job"] not in ("", after_job):
            return progress
        time.sleep(0.02)
    raise AssertionError("no job started sampling")


INTERRUPTED = re.compile(r"Interrupted: after (\d+) of (\d+) steps")


def test_interrupt_answers_200_with_the_images_so_far(server, api):
    """As A1111: the running job stops at its next step, answers 200 with its last x0 estimate decoded, and runs no more batches."""
    outcome = {}
    client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)  # its own session: the test's api polls meanwhile
    thread = threading.Thread(target=lambda: outcome.setdefault("result", client.txt2img(
        prompt="x", seed=3, steps=150, n_iter=16, width=64, height=64, sampler_name="Euler")))
    thread.start()
    progress = _wait_for_sampling(api)
    assert progress["state"]["sampling_steps"] == 150 * 16 and 0 < progress["progress"] < 1 and not progress["state"]["interrupted"]
    # the live preview: the latest x0 estimate through the latent-to-RGB map, one pixel per latent cell, as A1111's Approx cheap
    preview = Image.open(io.BytesIO(base64.b64decode(api.get_progress()["current_image"])))
    assert preview.format == "PNG" and preview.size == (8, 8) and preview.mode == "RGB" and np.asarray(preview).std() > 0
    assert httpx.get(f"{server.url}/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
    started = time.monotonic()
    api.interrupt()
    thread.join(timeout=60)
    assert time.monotonic() - started < 10, "interrupt did not stop the job"
    result = outcome["result"]  # webuiapi raises on any status but 200
    assert 1 <= len(result.images) < 16 and result.info["all_seeds"] == list(range(3, 3 + len(result.images)))
    *whole, last = result.info["infotexts"]
    steps_run, of = map(int, INTERRUPTED.search(last).groups())
    assert 0 < steps_run < 150 and of == 150 and "Steps: 150," in last and not any("Interrupted" in text for text in whole)
    image = result.images[-1]
    assert image.size == (64, 64) and np.asarray(image).std() > 0 and image.info["parameters"] == last  # a real PNG with its infotext
    state = api.get_progress()["state"]
    assert state["interrupted"] and state["job"] == ""  # A1111 keeps the flag until the next job starts
    assert api.txt2img(prompt="after", seed=1, steps=2, width=64, height=64).image.size == (64, 64)
    assert not api.get_progress()["state"]["interrupted"]


def test_an_interrupted_openai_request_is_a_409_the_client_does_not_retry(server, api):
    """OpenAI's API has no partial answer: the interrupted job is an error, marked so the openai client does not rerun it."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")  # default retries: 2, and a 409 is retried unless told
    outcome = {}

    def generate():
        try:
            client.images.generate(prompt="x", n=10, size="64x64")
        except openai.APIStatusError as error:
            outcome["error"] = error

    thread = threading.Thread(target=generate)
    thread.start()
    _wait_for_sampling(api)
    api.interrupt()
    thread.join(timeout=60)
    error = outcome["error"]
    assert error.status_code == 409 and "interrupted" in error.message and error.body["type"] == "invalid_request_error"
    time.sleep(0.5)
    assert api.get_progress()["state"]["job"] == "", "the openai client sent the interrupted request again"


def test_client_disconnect_frees_the_slot(server, api):
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 150, "n_iter": 16, "width": 64, "height": 64}, timeout=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and api.get_progress()["state"]["job"]:
        time.sleep(0.1)
    assert api.get_progress()["state"]["job"] == "", "the abandoned job still holds the engine"


def test_identical_queued_img2img_jobs_can_be_interrupted(server, api):
    """Jobs are told apart by identity: two equal img2img requests (arrays inside) must not confuse the queue."""
    source = base64.b64encode(_png(Image.new("RGB", (64, 64), "gray"))).decode()
    body = {"prompt": "x", "seed": 42, "steps": 150, "n_iter": 16, "width": 64, "height": 64, "init_images": [source], "denoising_strength": 1.0}
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(httpx.post, f"{server.url}/sdapi/v1/img2img", json=body, timeout=120) for _ in range(2)]
        job = ""
        for _ in range(2):
            job = _wait_for_sampling(api, after_job=job)["state"]["job"]
            assert httpx.post(f"{server.url}/sdapi/v1/interrupt").status_code == 200
        responses = [f.result() for f in pending]
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert all(INTERRUPTED.search(json.loads(r.json()["info"])["infotexts"][-1]) for r in responses)
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_metrics_report_queue_latency_and_statuses(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("sdfast_queue_depth", "sdfast_in_flight", "sdfast_stage_seconds_bucket{le=", 'stage="unet_step"',
                 'sdfast_requests_total{endpoint="/sdapi/v1/txt2img",status="200"}', 'status="422"'):
        assert name in text, name


def test_access_log_is_structured(server):
    httpx.get(f"{server.url}/health")
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert any(line["path"] == "/health" and line["status"] == 200 and "ms" in line for line in lines)


def test_full_queue_answers_429_with_retry_after(tiny_engine):
    slow = Server(tiny_engine, "--max-queue", "1")
    try:
        body = {"prompt": "x", "steps": 60, "width": 64, "height": 64}
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{slow.url}/sdapi/v1/txt2img", json=body, timeout=120), range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert httpx.get(f"{slow.url}/health").status_code == 200
    finally:
        assert slow.stop()


def test_api_key_rules(tiny_engine):
    refused = subprocess.run([sys.executable, "-m", "sdfast", "serve", str(tiny_engine), "--host", "0.0.0.0", "--port", str(_free_port())],
                             capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "SDFAST_API_KEY"})
    assert refused.returncode == 2 and "refusing to bind 0.0.0.0 without --api-key" in refused.stderr
    assert "Traceback" not in refused.stderr
    keyed = Server(tiny_engine, "--api-key", API_KEY)
    try:
        body = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
        assert httpx.post(f"{keyed.url}/sdapi/v1/txt2img", json=body).status_code == 401
        assert httpx.post(f"{keyed.url}/sdapi/v1/txt2img", json=body, headers={"Authorization": "Bearer wrong-key-000"}).status_code == 401
        assert httpx.post(f"{keyed.url}/sdapi/v1/txt2img", json=body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert httpx.get(f"{keyed.url}/health").status_code == 200  # probes stay open
        client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=API_KEY)  # the openai client sends the Bearer header
        assert len(client.images.generate(prompt="x", n=1, size="64x64").data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong-key-000").images.generate(prompt="x", size="64x64")
    finally:
        assert keyed.stop()


def test_graceful_shutdown_finishes_the_running_request(tiny_engine):
    server = Server(tiny_engine)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("r", httpx.post(
        f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 100, "width": 64, "height": 64}, timeout=120)))
    thread.start()
    time.sleep(0.5)
    assert server.stop()
    thread.join(timeout=60)
    assert outcome["r"].status_code == 200 and len(outcome["r"].json()["images"]) == 1


def test_shutdown_past_its_grace_is_an_error_not_an_interrupt(tiny_engine):
    """The running job of a server that stops is refused (503), not answered with an interrupt's unfinished image."""
    pipeline = Pipeline.load(tiny_engine, verify="size")

    async def scenario():
        worker = Worker(max_queue=4)
        worker.start(asyncio.get_running_loop())
        job = asyncio.ensure_future(worker.submit(pipeline, GenerationRequest("x", steps=1000, seeds=[1]), 1, timeout_s=120))
        while worker.stats.current is None or worker.stats.current.step == 0:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(worker.stop, 0.1)
        with pytest.raises(Cancelled, match="the server is shutting down"):
            await job

    asyncio.run(scenario())


def test_micro_batching_merges_requests_that_differ_only_in_seed(tiny_engine_batch2_unguided):
    server = Server(tiny_engine_batch2_unguided)
    try:
        body = {"prompt": "a boat", "steps": 40, "cfg_scale": 1.0, "width": 64, "height": 64, "sampler_name": "Euler a"}
        httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "seed": 99}, timeout=60)  # warm up
        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(lambda seed: httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "seed": seed}, timeout=120),
                                      [10, 11, 12]))
        assert [r.status_code for r in responses] == [200] * 3
        metrics = httpx.get(f"{server.url}/metrics").text
        merged = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("sdfast_merged_jobs ")))
        assert merged >= 2, "two queued requests with the same prompt should have shared one engine batch"
        alone = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "seed": 12}, timeout=60)
        merged_image = np.asarray(Image.open(io.BytesIO(base64.b64decode(responses[2].json()["images"][0]))), dtype=int)
        alone_image = np.asarray(Image.open(io.BytesIO(base64.b64decode(alone.json()["images"][0]))), dtype=int)
        assert np.abs(merged_image - alone_image).max() <= 1  # a seed gives its image whichever batch it ran in
        default_cfg = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}, timeout=60)
        assert default_cfg.status_code == 200, default_cfg.text  # no cfg_scale: the unguided engine's 1, not A1111's 7
        assert "CFG scale: 1.0" in json.loads(default_cfg.json()["info"])["infotexts"][0]
        # A1111's interrupt is global: the two merged jobs stop together, at the same step, each with its own image
        api, long = webuiapi.WebUIApi(host="127.0.0.1", port=server.port), {**body, "steps": 1000}
        with ThreadPoolExecutor(3) as pool:
            alone = pool.submit(httpx.post, f"{server.url}/sdapi/v1/txt2img", json={**long, "seed": 1}, timeout=120)
            job = _wait_for_sampling(api)["state"]["job"]
            pair = [pool.submit(httpx.post, f"{server.url}/sdapi/v1/txt2img", json={**long, "seed": seed}, timeout=120) for seed in (2, 3)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and api.get_progress()["state"]["job_count"] < 3:
                time.sleep(0.02)
            api.interrupt()
            _wait_for_sampling(api, after_job=job)
            api.interrupt()
            responses = [alone.result(), *(f.result() for f in pair)]
        assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
        infotexts = [json.loads(r.json()["info"])["infotexts"] for r in responses]
        assert [len(texts) for texts in infotexts] == [1, 1, 1] and "Seed: 2," in infotexts[1][0] and "Seed: 3," in infotexts[2][0]
        stopped_at = [INTERRUPTED.search(texts[0]).groups() for texts in infotexts]
        assert stopped_at[1] == stopped_at[2], stopped_at  # one engine batch
    finally:
        assert server.stop()


def test_cli_errors_are_one_line(server, tmp_path):
    for args, message in (([str(tmp_path / "missing")], "does not exist"),
                          ([str(server_engine(server)), "--port", str(server.port)], f"cannot listen on 127.0.0.1:{server.port}"),
                          ([str(server_engine(server)), "--port", "0"], "is not a port number"),
                          ([str(server_engine(server)), "--api-key", "short"], "at least 8 characters")):
        done = subprocess.run([sys.executable, "-m", "sdfast", "serve", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def server_engine(server) -> str:
    return server.process.args[4]


def test_deepcache_on_an_engine_dir_without_the_step_cache_is_a_422(server):
    settings = {"deepcache_enable": True, "deepcache_full_run_step_rate": 3}
    refused = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": settings})
    assert refused.status_code == 422 and refused.json()["field"] == "override_settings.deepcache_enable"
    assert "export --step-cache" in refused.json()["error"]
