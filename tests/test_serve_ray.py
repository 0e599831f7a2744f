"""sdfast serve --ray: the same routes on Ray Serve, on a local Ray cluster the server starts and stops on loopback
(no dashboard), driven by webuiapi, openai and plain HTTP."""
import base64
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli, visible_lines
from tests.test_serve import Server, _free_port

pytest.importorskip("ray.serve")
webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.ray

BODY = {"prompt": "a lighthouse", "seed": 21, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}


class RayServer(Server):
    """`sdfast serve --ray` in its own process; SIGTERM stops the application and the Ray it started."""

    def __init__(self, engine, *args):
        super().__init__(engine, "--ray", "--cpus-per-replica", "0.5", *args)


def _post(server, path="/sdapi/v1/txt2img", **fields):
    return httpx.post(f"{server.url}{path}", json={**BODY, **fields}, timeout=180)


@pytest.fixture(scope="module")
def two_replicas(tiny_engine, tiny_sd2_engine):
    server = RayServer(tiny_engine, "--engine", f"sd2={tiny_sd2_engine}", "--replicas", "2")
    yield server
    assert server.stop()


def test_two_replicas_serve_both_apis_and_share_the_requests(two_replicas):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=two_replicas.port)
    first = api.txt2img(**BODY)
    assert first.image.size == (64, 64) and first.info["seed"] == 21
    client = openai.OpenAI(base_url=f"{two_replicas.url}/v1", api_key="unused")
    generated = client.images.generate(model="sdfast", prompt="a lighthouse", size="64x64", response_format="b64_json")
    assert base64.b64decode(generated.data[0].b64_json)[:8] == b"\x89PNG\r\n\x1a\n"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _post(two_replicas), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert len({a.headers["x-sdfast-replica"] for a in answers}) == 2, "every request went to one replica"
    assert {a.json()["images"][0] for a in answers} == {first.json["images"][0]}  # the same seed, the same PNG, on either replica


def test_requests_route_to_their_model(two_replicas):
    tiny, sd2 = _post(two_replicas), _post(two_replicas, override_settings={"sd_model_checkpoint": "sd2"})
    assert json.loads(tiny.json()["info"])["sd_model_name"] == "tiny" and json.loads(sd2.json()["info"])["sd_model_name"] == "sd2"
    assert tiny.json()["images"][0] != sd2.json()["images"][0]
    client = openai.OpenAI(base_url=f"{two_replicas.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny", "sd2"]
    by_model = client.images.generate(model="sd2", prompt="a lighthouse", size="64x64", response_format="b64_json")
    assert by_model.data[0].b64_json
    with pytest.raises(openai.NotFoundError, match="no model 'sd3'"):
        client.images.generate(model="sd3", prompt="x", size="64x64")
    refused = _post(two_replicas, override_settings={"sd_model_checkpoint": "sd3"})
    assert refused.status_code == 422 and refused.json()["field"] == "override_settings.sd_model_checkpoint"
    # the current model, set as webuiapi sets it, holds for later requests that name none, on every replica
    api = webuiapi.WebUIApi(host="127.0.0.1", port=two_replicas.port)
    sd2_title = next(title for title in api.util_get_model_names() if title.startswith("sd2 ["))
    api.util_set_model(sd2_title, find_closest=False)
    try:
        assert api.util_get_current_model() == sd2_title
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: _post(two_replicas), range(4)))
        assert {a.json()["images"][0] for a in answers} == {sd2.json()["images"][0]}
    finally:
        api.util_set_model(next(t for t in api.util_get_model_names() if t.startswith("tiny [")), find_closest=False)


def test_progress_interrupt_and_metrics_work_across_replicas(two_replicas):
    """Two long jobs: /progress (from the replicas' reports) shows a running one and counts both; interrupts, which
    reach the replicas through the board, stop each job with its images so far; /metrics labels each replica's
    samples."""
    from prometheus_client.parser import text_string_to_metric_families

    def images_by_replica() -> dict[str, float]:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{two_replicas.url}/metrics").text)}
        return {s.labels["replica"]: s.value for s in families["sdfast_images"].samples if s.name == "sdfast_images_total"}

    time.sleep(1)  # the replicas' reports of the images made before this test
    before = images_by_replica()
    api = webuiapi.WebUIApi(host="127.0.0.1", port=two_replicas.port)
    with ThreadPoolExecutor(2) as pool:
        long = [pool.submit(_post, two_replicas, steps=1000, seed=seed) for seed in (31, 32)]
        deadline = time.monotonic() + 60
        progress = api.get_progress()
        while time.monotonic() < deadline and not (progress["state"]["sampling_step"] > 0 and progress["state"]["job_count"] == 2):
            time.sleep(0.1)
            progress = api.get_progress()
        assert progress["state"]["job_count"] == 2 and " on " in progress["state"]["job"], progress["state"]
        assert 0 < progress["progress"] < 1 and progress["current_image"]
        while not all(future.done() for future in long):  # the two may share a replica: the second runs after the first stops
            api.interrupt()
            time.sleep(0.5)
        answers = [future.result() for future in long]
    assert [a.status_code for a in answers] == [200, 200]
    for answer in answers:
        assert re.search(r"Interrupted: after \d+ of 1000 steps", json.loads(answer.json()["info"])["infotexts"][0])
    time.sleep(1)  # the replicas' next reports
    after = images_by_replica()
    assert len(after) == 2 and sum(after.values()) - sum(before.values()) == 2, (before, after)
    answered_by = [a.headers["x-sdfast-replica"] for a in answers]
    assert all(after[r] - before.get(r, 0) >= answered_by.count(r) for r in set(answered_by)), (before, after, answered_by)


def test_merged_metrics_keep_each_family_together_with_a_replica_label():
    from prometheus_client.parser import text_string_to_metric_families

    from sdfast.serve.ray_board import merged_metrics, merged_progress

    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    def exposition(count: int) -> str:
        registry = CollectorRegistry()
        Counter("x", 'things "quoted"', ["kind"], registry=registry).labels("a").inc(count)
        Histogram("h", "seconds", buckets=(1, 5), registry=registry).observe(count)
        return generate_latest(registry).decode()

    merged = merged_metrics({"r1": exposition(2), "r2": exposition(5)})
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert sorted((s.labels["replica"], s.value) for s in families["x"].samples) == [("r1", 2.0), ("r2", 5.0)]
    assert merged.count("# TYPE x_total counter") == 1 and merged.count("# TYPE h histogram") == 1
    assert "_created" not in merged and families["x"].documentation == 'things "quoted"'
    counts = {s.labels["replica"]: s.value for s in families["h"].samples if s.name == "h_count"}
    assert counts == {"r1": 1.0, "r2": 1.0}
    idle = {"progress": 0.0, "current_image": None, "state": {"job": "", "job_count": 0, "interrupted": False}}
    busy = {"progress": 0.5, "current_image": "png", "state": {"job": "job 3", "job_count": 2, "interrupted": False}}
    answer = merged_progress({"a": (idle, None, ""), "b": (busy, 100.0, "")}, skip_current_image=False)
    assert answer["state"]["job"] == "job 3 on b" and answer["state"]["job_count"] == 2 and answer["current_image"] == "png"
    assert merged_progress({}, False) is None


def _replica_pids(server) -> set[int]:
    """The engine replicas' processes of ``server``'s Ray (below its process; Ray titles them
    ray::ServeReplica:<app>:<deployment>)."""
    parents, titles = {}, {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("PPid:"))
            pid = int(status.parent.name)
            parents[pid], titles[pid] = ppid, (status.parent / "cmdline").read_bytes()
        except (OSError, StopIteration, ValueError):
            pass

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == server.process.pid:
                return True
        return False

    return {pid for pid, title in titles.items() if b"ServeReplica:sdfast:sdfast-engines" in title and below(pid)}


def test_a_killed_replica_loses_no_request_and_the_deployment_recovers(two_replicas):
    """SIGKILL to a replica mid-generation: every request still ends in its image (retried on a live replica: the same
    seed, the same image), none hangs; Ray starts a new replica and both serve again. Runs last: it kills one of the
    module's replicas."""
    expected = _post(two_replicas, steps=600, seed=5).json()["images"][0]
    pids = _replica_pids(two_replicas)
    assert len(pids) == 2, pids
    api = webuiapi.WebUIApi(host="127.0.0.1", port=two_replicas.port)
    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(_post, two_replicas, steps=600, seed=5) for _ in range(4)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and api.get_progress()["state"]["sampling_step"] == 0:
            time.sleep(0.02)
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        answers = [future.result(timeout=170) for future in pending]
    # each replica held two of the four (twice its engine batch) when one was killed, early in 600 steps: its two were
    # sent again, to a live replica, and give the image they would have given
    assert [a.status_code for a in answers] == [200] * 4, [a.text[:200] for a in answers]
    assert all(a.json()["images"][0] == expected for a in answers)
    deadline, seen = time.monotonic() + 120, set()
    while time.monotonic() < deadline and not (len(seen) == 2 and victim not in _replica_pids(two_replicas)):
        with ThreadPoolExecutor(6) as pool:  # a burst: one replica alone cannot take it all at once
            burst = list(pool.map(lambda seed: _post(two_replicas, seed=seed), range(6)))
        seen = {answer.headers["x-sdfast-replica"] for answer in burst if answer.status_code == 200}
        time.sleep(0.5)
    assert len(seen) == 2 and len(_replica_pids(two_replicas)) == 2, "the deployment did not come back to two serving replicas"


def test_a_full_deployment_answers_429_with_retry_after(tiny_engine):
    server = RayServer(tiny_engine, "--replicas", "1", "--max-queue", "1")
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda seed: _post(server, steps=60, seed=seed), range(8)))
        statuses = [a.status_code for a in answers]
        assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
        refused = next(a for a in answers if a.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1 and "busy" in refused.json()["error"]
    finally:
        assert server.stop()


def test_autoscaling_adds_a_replica_under_load(tiny_engine):
    """--autoscale 1:2 starts one replica; requests kept ongoing beyond its target bring a second one."""
    server = RayServer(tiny_engine, "--autoscale", "1:2", "--max-queue", "64")
    try:
        assert len(_replica_pids(server)) == 1
        deadline, pids = time.monotonic() + 120, set()
        with ThreadPoolExecutor(6) as pool:
            while time.monotonic() < deadline and len(pids) < 2:
                answers = list(pool.map(lambda seed: _post(server, steps=150, seed=seed), range(6)))
                assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers]
                pids = _replica_pids(server)
        assert len(pids) == 2, "no second replica under sustained load"
    finally:
        assert server.stop()


def test_ray_arguments_are_checked_before_ray_starts(tiny_engine, tmp_path):
    for args, message in [(("--ray", "--autoscale", "3:1"), "expected MIN:MAX"),
                          (("--ray", "--max-memory", "4"), "not supported with --ray"),
                          (("--ray", "--backend", "cuda"), "not supported with --ray"),
                          (("--replicas", "2"), "are for --ray"),
                          (("--ray", "--engine", f"x={tmp_path / 'missing'}"), "missing")]:
        result = run_cli("serve", str(tiny_engine), *args, "--port", "1")
        lines = visible_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)


def test_a_replica_that_cannot_load_its_engine_fails_the_start_in_one_line(tiny_engine, tmp_path):
    """A corrupt engine dir (a graph cut short) is found by the replicas, which Ray does not retry forever."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_engine, broken)
    data = max(broken.glob("unet*.onnx*"), key=lambda path: path.stat().st_size)
    data.write_bytes(data.read_bytes()[:1000])
    result = run_cli("serve", str(broken), "--ray", "--cpus-per-replica", "0.5", "--verify", "size", "--port", str(_free_port()), timeout=300)
    lines = visible_lines(result.stderr)
    assert result.returncode == 2 and lines and "did not start" in lines[-1] and "bytes, the manifest says" in lines[-1], result.stderr[-3000:]
