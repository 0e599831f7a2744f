"""TensorRT engine cache: keys by GPU, compute capability, TensorRT version and ONNX hash; staleness; tensorrt/cache.json.

Pure Python, so it runs without TensorRT; the build itself is in the gpu-marked test at the end.
"""
import dataclasses
import hashlib
import importlib.util
import json
import multiprocessing
import shutil

import numpy as np
import pytest

from sdfast.errors import EngineError
from sdfast.runtime import trt_cache
from sdfast.runtime.backends import tensorrt as trt_backend
from sdfast.runtime.images import psnr
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import run_cli


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    return copy


def _key(engine_dir, component="unet", gpu="NVIDIA H100 80GB HBM3", cc="9.0", trt="10.13.3.9"):
    return trt_cache.key_for(read_manifest(engine_dir).components[component], gpu, cc, trt)


def _manifest(engine_dir):
    return json.loads((engine_dir / "manifest.json").read_text())


def _entries(engine_dir):
    return json.loads((engine_dir / trt_cache.CACHE_FILE).read_text())["engines"]


def test_key_fields_and_digest(engine_copy):
    key = _key(engine_copy)
    assert key.onnx_sha256 == _manifest(engine_copy)["components"]["unet"]["files"]["unet.onnx"]["sha256"]
    profile = dict((name, (lo, opt, hi)) for name, lo, opt, hi in key.profile)
    lo, opt, hi = profile["encoder_hidden_states"]
    assert lo == opt and lo[1] == 77 and hi[1] == 77 * 8 and lo[0] == hi[0] == 2  # prompt length dynamic, all else fixed
    assert profile["sample"][0] == profile["sample"][2]
    assert key.digest() == _key(engine_copy).digest() and trt_cache.EngineKey.from_json(key.to_json()) == key
    for change in ({"gpu_name": "NVIDIA A100-SXM4-80GB"}, {"compute_capability": "8.0"}, {"tensorrt_version": "10.14.1.48"},
                   {"onnx_sha256": "0" * 64}, {"precision": "fp16" if key.precision == "fp32" else "fp32"}):
        assert dataclasses.replace(key, **change).digest() != key.digest(), change


def test_key_follows_the_graph_not_its_file_name(engine_copy):
    info = read_manifest(engine_copy).components["unet"]
    renamed = dataclasses.replace(info, file="renamed.onnx", files={"renamed.onnx": info.files[info.file]})
    assert trt_cache.key_for(renamed, "g", "9.0", "10").digest() == trt_cache.key_for(info, "g", "9.0", "10").digest()
    changed = dataclasses.replace(info, files={info.file: {**info.files[info.file], "sha256": "f" * 64}})
    assert trt_cache.key_for(changed, "g", "9.0", "10").digest() != trt_cache.key_for(info, "g", "9.0", "10").digest()


def test_record_then_lookup_and_the_engine_dir_still_loads(engine_copy):
    key = _key(engine_copy)
    manifest_before = (engine_copy / "manifest.json").read_bytes()
    assert trt_cache.lookup(engine_copy, key) is None
    plan = trt_cache.record(engine_copy, key, b"plan-bytes" * 100, 12.3)
    assert plan.read_bytes() == b"plan-bytes" * 100 and plan.parent.name == trt_cache.PLAN_DIR
    (entry,) = _entries(engine_copy)
    assert entry["key"]["gpu_name"] == key.gpu_name and entry["bytes"] == 1000 and entry["build_seconds"] == 12.3
    assert trt_cache.lookup(engine_copy, key, verify="full") == plan
    assert (engine_copy / "manifest.json").read_bytes() == manifest_before  # the export's artifact is never rewritten
    result = Pipeline.load(engine_copy, verify="full").generate(GenerationRequest(prompt="x", steps=2))
    assert result.images.shape[0] == 1 and np.isfinite(result.latents).all()


def test_stale_entries_are_replaced_and_their_plans_removed(engine_copy):
    old = _key(engine_copy, trt="10.13.3.9")
    old_plan = trt_cache.record(engine_copy, old, b"old", 1.0)
    other_gpu = trt_cache.record(engine_copy, _key(engine_copy, gpu="NVIDIA L4", cc="8.9"), b"l4", 1.0)
    text = trt_cache.record(engine_copy, _key(engine_copy, component="text_encoder"), b"text", 1.0)
    new = _key(engine_copy, trt="10.14.1.48")
    assert trt_cache.lookup(engine_copy, new) is None  # a TensorRT upgrade makes the plan stale
    assert [e["file"] for e in trt_cache.stale(trt_cache.read_entries(engine_copy), new)] == [old.plan_name()]
    new_plan = trt_cache.record(engine_copy, new, b"new", 2.0)
    assert not old_plan.exists() and new_plan.exists() and other_gpu.exists() and text.exists()
    assert sorted(e["key"]["tensorrt_version"] for e in _entries(engine_copy) if e["key"]["component"] == "unet") == ["10.13.3.9", "10.14.1.48"]
    assert trt_cache.lookup(engine_copy, old) is None and trt_cache.lookup(engine_copy, new) == new_plan


def test_another_sizes_plan_is_not_stale(engine_copy):
    """An engine dir with several sizes has a U-Net plan per size: building one keeps the others."""
    at_64 = _key(engine_copy)
    profile = tuple((name, *(tuple(d * 2 if name == "sample" and i >= 2 else d for i, d in enumerate(shape)) for shape in shapes))
                    for name, *shapes in at_64.profile)
    at_128 = dataclasses.replace(at_64, profile=profile, onnx_sha256="e" * 64)
    kept = trt_cache.record(engine_copy, at_64, b"64", 1.0)
    assert trt_cache.stale(trt_cache.read_entries(engine_copy), at_128) == []
    trt_cache.record(engine_copy, at_128, b"128", 1.0)
    assert kept.exists() and trt_cache.lookup(engine_copy, at_64) == kept


def test_damaged_or_missing_plans_are_stale(engine_copy):
    key = _key(engine_copy)
    plan = trt_cache.record(engine_copy, key, b"abcdef" * 10, 1.0)
    plan.write_bytes(b"abcdef" * 9)  # truncated
    assert trt_cache.lookup(engine_copy, key) is None
    plan.write_bytes(b"ABCDEF" * 10)  # same size, other bytes
    assert trt_cache.lookup(engine_copy, key, verify="size") == plan
    assert trt_cache.lookup(engine_copy, key, verify="full") is None
    plan.unlink()
    assert trt_cache.lookup(engine_copy, key) is None


def test_records_leave_manifest_json_as_exported_and_info_shows_them(engine_copy):
    """The cache has its own file: manifest.json keeps its bytes, --verify still passes, and info lists the engines."""
    manifest_sha = hashlib.sha256((engine_copy / "manifest.json").read_bytes()).hexdigest()
    keys = [_key(engine_copy, component=name) for name in ("text_encoder", "unet", "vae_decoder")]
    for key in keys:
        trt_cache.record(engine_copy, key, key.component.encode() * 1000, 60.0)
    trt_cache.record(engine_copy, _key(engine_copy, trt="10.14.1.48"), b"newer" * 1000, 61.0)  # replaces the unet entry
    assert hashlib.sha256((engine_copy / "manifest.json").read_bytes()).hexdigest() == manifest_sha
    assert "tensorrt_engines" not in _manifest(engine_copy)
    shown = run_cli("info", engine_copy, "--verify")
    assert shown.returncode == 0, shown.stderr
    assert "all sha256 match" in shown.stdout and "NVIDIA H100 80GB HBM3 (9.0)" in shown.stdout
    listed = [line.split()[0] for line in shown.stdout.split("tensorrt engine", 1)[1].splitlines()[1:] if line]
    assert sorted(listed) == ["text_encoder", "unet", "vae_decoder"]
    as_json = json.loads(run_cli("info", engine_copy, "--json").stdout)
    assert sorted((e["key"]["component"], e["key"]["tensorrt_version"]) for e in as_json["tensorrt_engines"]) == [
        ("text_encoder", "10.13.3.9"), ("unet", "10.14.1.48"), ("vae_decoder", "10.13.3.9")]


def _record_many(engine_dir, keys, start):
    start.wait()  # both processes begin together
    for key in keys:
        trt_cache.record(engine_dir, key, key.gpu_name.encode(), 1.0)


def test_processes_recording_at_once_lose_no_entry(engine_copy):
    """Two real processes record 20 engines each at the same time: all 40 entries survive (the cache's lock)."""
    keys = {side: [_key(engine_copy, gpu=f"GPU {side}{i}") for i in range(20)] for side in "AB"}
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [context.Process(target=_record_many, args=(engine_copy, keys[side], start)) for side in "AB"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0, 0]
    recorded = sorted(e["key"]["gpu_name"] for e in trt_cache.read_entries(engine_copy))
    assert recorded == sorted(key.gpu_name for side in "AB" for key in keys[side])
    for side in "AB":
        assert all(trt_cache.lookup(engine_copy, key, verify="full") is not None for key in keys[side])


def test_cache_entries_and_plans_are_confined_to_the_engine_dir(engine_copy, tmp_path):
    """A crafted cache, or a tensorrt/ that links out, never makes sdfast read, write or delete a file elsewhere."""
    old, new = _key(engine_copy, trt="10.13.3.9"), _key(engine_copy, trt="10.14.1.48")
    trt_cache.record(engine_copy, old, b"old", 1.0)
    outside = tmp_path / "outside"
    (engine_copy / trt_cache.PLAN_DIR).rename(outside)  # the plans and their cache, moved out of the engine dir...
    (engine_copy / trt_cache.PLAN_DIR).symlink_to(outside, target_is_directory=True)  # ...and linked back in
    victim, before = outside / old.plan_name().split("/")[-1], sorted(outside.iterdir())
    for action in (lambda: trt_cache.lookup(engine_copy, old), lambda: trt_cache.record(engine_copy, new, b"new", 1.0)):
        with pytest.raises(EngineError, match="leads out of the engine dir"):
            action()
    assert victim.read_bytes() == b"old" and sorted(outside.iterdir()) == before  # the stale plan out there is not deleted

    (engine_copy / trt_cache.PLAN_DIR).unlink()
    (engine_copy / trt_cache.PLAN_DIR).mkdir()
    (engine_copy / old.plan_name()).symlink_to(victim)  # a plan file that is a link out
    (engine_copy / trt_cache.CACHE_FILE).write_text(json.dumps({"format": trt_cache.CACHE_FORMAT, "engines": [
        {"digest": old.digest(), "key": old.to_json(), "file": old.plan_name(), "bytes": 9, "sha256": "0" * 64}]}))
    with pytest.raises(EngineError, match="leads out of the engine dir"):
        trt_cache.lookup(engine_copy, old)

    entry = {"digest": old.digest(), "key": old.to_json(), "file": "../outside/" + victim.name, "bytes": 9, "sha256": "0" * 64}
    (engine_copy / trt_cache.CACHE_FILE).write_text(json.dumps({"format": trt_cache.CACHE_FORMAT, "engines": [entry]}))
    for action in (lambda: trt_cache.lookup(engine_copy, old), lambda: trt_cache.record(engine_copy, new, b"new", 1.0)):
        with pytest.raises(EngineError, match="does not match its key"):  # an entry names only its own plan
            action()
    assert victim.read_bytes() == b"old"
    completed = run_cli("info", engine_copy)
    assert completed.returncode == 2 and "cache.json: malformed" in completed.stderr and "Traceback" not in completed.stderr


def test_tensorrt_backend_builds_once_into_the_cache_file(engine_copy, monkeypatch):
    """TensorRTBackend.load's cache path, with TensorRT and CUDA stood in for: build once, record, then reuse."""

    class FakeTensorRT:
        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return ("deserialized", bytes(data))

    builds = []

    def build_plan(info, onnx_path, profile, timing_cache, report):
        builds.append((info.name, onnx_path, timing_cache))
        return b"plan of " + info.name.encode()

    backend = trt_backend.TensorRTBackend()
    monkeypatch.setattr(trt_backend, "_trt", lambda: FakeTensorRT)
    monkeypatch.setattr(trt_backend, "build_plan", build_plan)
    monkeypatch.setattr(trt_backend, "TrtEngine", lambda info, engine, stream: engine)
    monkeypatch.setattr(backend, "available", lambda: (True, ""))
    monkeypatch.setattr(backend, "key", lambda info: _key(engine_copy, component=info.name))
    monkeypatch.setattr(backend, "_stream", type("Stream", (), {"get": lambda self: None})())
    manifest_before = (engine_copy / "manifest.json").read_bytes()
    manifest = read_manifest(engine_copy)
    info = manifest.components["unet"]
    assert backend.load(info, manifest.path(info.file)) == ("deserialized", b"plan of unet")
    assert builds == [("unet", engine_copy / "unet.onnx", engine_copy / trt_cache.TIMING_CACHE)]
    assert backend.load(info, manifest.path(info.file)) == ("deserialized", b"plan of unet") and len(builds) == 1
    assert [e["key"]["component"] for e in _entries(engine_copy)] == ["unet"]
    assert (engine_copy / "manifest.json").read_bytes() == manifest_before


def test_read_only_engine_dir_is_said_plainly(engine_copy, monkeypatch):
    monkeypatch.setattr(trt_cache.os, "access", lambda path, mode: False)
    with pytest.raises(EngineError, match="read-only: the tensorrt backend stores the engines it builds there"):
        trt_cache.writable(engine_copy)


needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed")


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_builds_caches_and_matches_cpu(tiny_fp16_engine, tmp_path):
    """On a GPU with TensorRT: build, reuse the cached plan, and agree with the CPU image."""
    from sdfast.runtime.backends import get_backend

    ok, why = get_backend("tensorrt").available()
    if not ok:
        pytest.skip(why)
    engine = tmp_path / "trt"
    shutil.copytree(tiny_fp16_engine, engine)
    request = GenerationRequest(prompt="a lighthouse", steps=8, seed=1, sampler="euler_a")
    first = Pipeline.load(engine, backend="tensorrt").generate(request)
    entries = _entries(engine)
    assert {e["key"]["component"] for e in entries} >= {"text_encoder", "unet", "vae_decoder"}
    second = Pipeline.load(engine, backend="tensorrt").generate(request)
    assert _entries(engine) == entries  # reused, not rebuilt
    assert np.array_equal(first.images, second.images)
    cpu = Pipeline.load(engine, backend="cpu", loop="numpy").generate(request)
    assert psnr(first.images, cpu.images) > 30
