"""TensorRT engine cache: keys by GPU, compute capability, TensorRT version and ONNX hash; staleness; manifest entries.

Pure Python, so it runs without TensorRT; the build itself is in the gpu-marked test at the end.
"""
import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import pytest

from sdfast.errors import EngineError
from sdfast.runtime import trt_cache
from sdfast.runtime.images import psnr
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.pipeline import GenerationRequest, Pipeline


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    return copy


def _key(engine_dir, component="unet", gpu="NVIDIA H100 80GB HBM3", cc="9.0", trt="10.13.3.9"):
    return trt_cache.key_for(read_manifest(engine_dir).components[component], gpu, cc, trt)


def _manifest(engine_dir):
    return json.loads((engine_dir / "manifest.json").read_text())


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
    assert trt_cache.lookup(engine_copy, _manifest(engine_copy), key) is None
    plan = trt_cache.record(engine_copy, key, b"plan-bytes" * 100, 12.3)
    assert plan.read_bytes() == b"plan-bytes" * 100 and plan.parent.name == trt_cache.PLAN_DIR
    data = _manifest(engine_copy)
    (entry,) = data[trt_cache.SECTION]
    assert entry["key"]["gpu_name"] == key.gpu_name and entry["bytes"] == 1000 and entry["build_seconds"] == 12.3
    assert trt_cache.lookup(engine_copy, data, key, verify="full") == plan
    assert data["components"] == json.loads(json.dumps(data["components"]))  # the rest of the manifest is untouched
    result = Pipeline.load(engine_copy, verify="full").generate(GenerationRequest(prompt="x", steps=2))
    assert result.images.shape[0] == 1 and np.isfinite(result.latents).all()


def test_stale_entries_are_replaced_and_their_plans_removed(engine_copy):
    old = _key(engine_copy, trt="10.13.3.9")
    old_plan = trt_cache.record(engine_copy, old, b"old", 1.0)
    other_gpu = trt_cache.record(engine_copy, _key(engine_copy, gpu="NVIDIA L4", cc="8.9"), b"l4", 1.0)
    text = trt_cache.record(engine_copy, _key(engine_copy, component="text_encoder"), b"text", 1.0)
    new = _key(engine_copy, trt="10.14.1.48")
    assert trt_cache.lookup(engine_copy, _manifest(engine_copy), new) is None  # a TensorRT upgrade makes the plan stale
    assert [e["file"] for e in trt_cache.stale(_manifest(engine_copy), new)] == [old.plan_name()]
    new_plan = trt_cache.record(engine_copy, new, b"new", 2.0)
    data = _manifest(engine_copy)
    assert not old_plan.exists() and new_plan.exists() and other_gpu.exists() and text.exists()
    assert sorted(e["key"]["tensorrt_version"] for e in data[trt_cache.SECTION] if e["key"]["component"] == "unet") == ["10.13.3.9", "10.14.1.48"]
    assert trt_cache.lookup(engine_copy, data, old) is None and trt_cache.lookup(engine_copy, data, new) == new_plan


def test_damaged_or_missing_plans_are_stale(engine_copy):
    key = _key(engine_copy)
    plan = trt_cache.record(engine_copy, key, b"abcdef" * 10, 1.0)
    plan.write_bytes(b"abcdef" * 9)  # truncated
    assert trt_cache.lookup(engine_copy, _manifest(engine_copy), key) is None
    plan.write_bytes(b"ABCDEF" * 10)  # same size, other bytes
    assert trt_cache.lookup(engine_copy, _manifest(engine_copy), key, verify="size") == plan
    assert trt_cache.lookup(engine_copy, _manifest(engine_copy), key, verify="full") is None
    plan.unlink()
    assert trt_cache.lookup(engine_copy, _manifest(engine_copy), key) is None


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
    entries = _manifest(engine)[trt_cache.SECTION]
    assert {e["key"]["component"] for e in entries} >= {"text_encoder", "unet", "vae_decoder"}
    second = Pipeline.load(engine, backend="tensorrt").generate(request)
    assert _manifest(engine)[trt_cache.SECTION] == entries  # reused, not rebuilt
    assert np.array_equal(first.images, second.images)
    cpu = Pipeline.load(engine, backend="cpu", loop="numpy").generate(request)
    assert psnr(first.images, cpu.images) > 30
