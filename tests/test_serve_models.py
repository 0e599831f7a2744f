"""Several models in one server: routing by A1111's checkpoint and OpenAI's model, loading on demand under a budget, and
no micro-batch across models. Real HTTP on loopback with webuiapi and openai; the pool's waiting rules in-process."""
import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sdfast.runtime.pipeline import Pipeline
from sdfast.serve.models import ModelPool, model_entries
from tests.conftest import run_cli, visible_lines
from tests.test_serve import Server, _wait_for_sampling

webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")

BODY = {"prompt": "a lighthouse", "seed": 11, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}


def _metric(server: Server, name: str, labels: str = "") -> float:
    """A sample of /metrics (prometheus text), 0 when absent."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


def _txt2img(server: Server, **fields) -> httpx.Response:
    return httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**BODY, **fields}, timeout=120)


@pytest.fixture(scope="module")
def two_models(tiny_engine, tiny_sd2_engine):
    """tiny (the default, named as exported) and tiny-sd2 (as 'sd2'), one loaded at a time."""
    server = Server(tiny_engine, "--engine", f"sd2={tiny_sd2_engine}", "--max-loaded", "1")
    yield server
    assert server.stop()


def test_a1111_requests_route_by_checkpoint_and_unload_the_least_recently_used(two_models):
    listed = httpx.get(f"{two_models.url}/sdapi/v1/sd-models").json()
    assert [(m["model_name"], m["family"], m["loaded"]) for m in listed] == [("tiny", "sd15", True), ("sd2", "sd15", False)]
    sd2_title = listed[1]["title"]
    tiny = _txt2img(two_models)
    sd2 = _txt2img(two_models, override_settings={"sd_model_checkpoint": "sd2"})
    assert tiny.status_code == sd2.status_code == 200, (tiny.text, sd2.text)
    assert json.loads(tiny.json()["info"])["sd_model_name"] == "tiny" and json.loads(sd2.json()["info"])["sd_model_name"] == "sd2"
    assert tiny.json()["images"][0] != sd2.json()["images"][0], "both requests ran the same model"
    # --max-loaded 1: sd2's load unloaded tiny; tiny loads again for the next request and gives the same bytes
    assert [m["loaded"] for m in httpx.get(f"{two_models.url}/sdapi/v1/sd-models").json()] == [False, True]
    assert _metric(two_models, "sdfast_model_loads_total", '{model="sd2"}') == 1
    assert _metric(two_models, "sdfast_model_unloads_total", '{model="tiny"}') == 1
    assert _txt2img(two_models).json()["images"][0] == tiny.json()["images"][0]
    assert _txt2img(two_models, override_settings={"sd_model_checkpoint": sd2_title}).json()["images"][0] == sd2.json()["images"][0]
    assert _metric(two_models, "sdfast_models_loaded") == 1
    # POST /sdapi/v1/options switches the server's model, as webuiapi's util_set_model does it
    api = webuiapi.WebUIApi(host="127.0.0.1", port=two_models.port)
    api.util_set_model(sd2_title, find_closest=False)
    assert api.util_get_current_model() == sd2_title
    plain = api.txt2img(**{k: v for k, v in BODY.items()})
    assert plain.info["sd_model_name"] == "sd2" and plain.json["images"][0] == sd2.json()["images"][0]
    api.util_set_model(listed[0]["title"], find_closest=False)
    assert api.util_get_current_model() == listed[0]["title"]
    assert httpx.post(f"{two_models.url}/sdapi/v1/refresh-checkpoints").status_code == 200


def test_openai_requests_route_by_model_and_list_every_model(two_models):
    client = openai.OpenAI(base_url=f"{two_models.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny", "sd2"]
    assert client.models.retrieve("sd2").id == "sd2"
    sd2 = client.images.generate(model="sd2", prompt="a lighthouse", size="64x64", response_format="b64_json")
    default = client.images.generate(model="dall-e-3", prompt="a lighthouse", size="64x64", response_format="b64_json")
    assert base64.b64decode(sd2.data[0].b64_json) != base64.b64decode(default.data[0].b64_json)  # dall-e-3: the current model
    ready = httpx.get(f"{two_models.url}/ready").json()
    assert ready["model"] == "tiny" and {name: m["loaded"] for name, m in ready["models"].items()} == {"tiny": True, "sd2": False}
    with pytest.raises(openai.NotFoundError, match="no model 'sd3'"):
        client.images.generate(model="sd3", prompt="x", size="64x64")


def test_unknown_checkpoints_are_refused_naming_the_field(two_models):
    refused = _txt2img(two_models, override_settings={"sd_model_checkpoint": "sd3"})
    assert refused.status_code == 422 and refused.json()["field"] == "override_settings.sd_model_checkpoint", refused.text
    assert "sd2 [" in refused.json()["error"]  # it names what the server has
    options = httpx.post(f"{two_models.url}/sdapi/v1/options", json={"sd_model_checkpoint": 3})
    assert options.status_code == 422 and options.json()["field"] == "sd_model_checkpoint"


def test_requests_for_different_models_never_share_an_engine_batch(tiny_engine_batch2_unguided):
    """The same engine dir under two names: two queued requests that differ only in seed share a batch for one model
    (the control), and never across the two."""
    server = Server(tiny_engine_batch2_unguided, "--engine", f"twin={tiny_engine_batch2_unguided}")
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        short = {**BODY, "cfg_scale": 1.0, "steps": 4}

        def queued_pair(models: tuple[str, str]) -> list[httpx.Response]:
            """Two short requests queued behind a long one, which is then interrupted."""
            with ThreadPoolExecutor(3) as pool:
                long = pool.submit(_txt2img, server, cfg_scale=1.0, steps=1000, seed=1)
                job = _wait_for_sampling(api)["state"]["job"]
                pair = [pool.submit(_txt2img, server, **{**short, "seed": seed, "override_settings": {"sd_model_checkpoint": model}})
                        for seed, model in zip((2, 3), models)]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and api.get_progress()["state"]["job_count"] < 3:
                    time.sleep(0.02)
                progress = api.get_progress()["state"]
                assert progress["job_count"] == 3 and progress["job"] == job  # the long one runs, the pair waits in the queue
                api.interrupt()
                assert long.result().status_code == 200
                return [future.result() for future in pair]

        assert _txt2img(server, override_settings={"sd_model_checkpoint": "twin"}).status_code == 200  # both loaded
        across = queued_pair(("tiny", "twin"))
        assert [r.status_code for r in across] == [200, 200] and _metric(server, "sdfast_merged_jobs") == 0
        same = queued_pair(("twin", "twin"))
        assert [r.status_code for r in same] == [200, 200] and _metric(server, "sdfast_merged_jobs") == 2
    finally:
        assert server.stop()


def test_bad_model_arguments_are_one_line_errors(tiny_engine, tiny_sd2_engine, tmp_path):
    cases = [
        ((), "no engine dir given"),
        (("--engine", "nodir"), "expected NAME=DIR"),
        (("--engine", f"a[1]={tiny_engine}"), "cannot hold brackets"),
        ((str(tiny_engine), str(tiny_engine)), "two engine dirs are named 'tiny'"),
        ((str(tiny_engine), "--engine", f"x={tmp_path / 'missing'}"), "missing"),
        ((str(tiny_engine), "--max-memory", "0.000001"), "over --max-memory"),
        ((str(tiny_engine), "--max-loaded", "0"), "--max-loaded must be at least 1"),
        ((str(tiny_engine), str(tiny_sd2_engine), "--refiner", str(tiny_engine)), "--refiner attaches to one model"),
    ]
    for args, message in cases:
        result = run_cli("serve", *args, "--port", "1")
        lines = visible_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)


# -- the pool's rules, in-process: a real pipeline behind a loader that can be held -------------------------------


def _pool(engines, max_loaded=None):
    gates = {name: threading.Event() for name, _ in engines}
    calls: list[str] = []

    def load(entry):
        calls.append(entry.name)
        assert gates[entry.name].wait(30), "the test never released this load"
        return Pipeline.load(entry.engine_dir, verify="size")

    return ModelPool(model_entries(engines, "cpu"), load, max_loaded=max_loaded), gates, calls


def test_a_load_never_blocks_a_loaded_model_and_is_shared_by_its_waiters(tiny_engine, tiny_sd2_engine):
    pool, gates, calls = _pool([("a", tiny_engine), ("b", tiny_sd2_engine)])
    gates["a"].set()
    pool.load_now("a")

    async def scenario():
        first, second = asyncio.ensure_future(pool.pipeline("b")), asyncio.ensure_future(pool.pipeline("b"))
        await asyncio.sleep(0.2)
        assert not first.done() and not second.done()  # b's load is held
        started = time.monotonic()
        loaded_a = await pool.pipeline("a")  # a is loaded: no wait behind b's load
        assert time.monotonic() - started < 0.1 and loaded_a is pool.entries["a"].pipeline
        gates["b"].set()
        assert await first is await second  # one load, both waiters
        assert calls == ["a", "b"]

    asyncio.run(scenario())


def test_a_model_in_use_is_unloaded_only_when_its_requests_end(tiny_engine, tiny_sd2_engine):
    pool, gates, calls = _pool([("a", tiny_engine), ("b", tiny_sd2_engine)], max_loaded=1)
    for gate in gates.values():
        gate.set()
    pool.load_now("a")
    unloaded: list[str] = []
    pool.on_event = lambda event, name, seconds: unloaded.append(name) if event == "unload" else None

    async def scenario():
        async with pool.use("a") as (pipeline_a, _):
            loading_b = asyncio.ensure_future(pool.pipeline("b"))
            await asyncio.sleep(0.3)
            assert not loading_b.done() and pool.entries["a"].pipeline is pipeline_a and unloaded == []
        await loading_b
        assert unloaded == ["a"] and [e.name for e in pool.loaded] == ["b"]

    asyncio.run(scenario())
