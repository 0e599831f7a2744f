"""Every path an engine dir names stays inside it: no absolute path, no '..', no link out, for every reader.

A shared engine dir may come from someone else: its manifest must not make sdfast read (or report on) files elsewhere.
"""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from sdfast.errors import EngineError
from sdfast.runtime.backends import get_backend
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import run_cli
from tests.test_cli import assert_clean_error

OUTSIDE_SIZE = 54321  # the outside file's size: no message has any other reason to print this number


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    return copy


@pytest.fixture
def outside(tmp_path):
    """A file beside the engine dir, not in it."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * OUTSIDE_SIZE)
    return secret


def _rewrite(engine_dir, mutate):
    path = engine_dir / "manifest.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


def _variant_file(name):
    def mutate(data):
        variant = data["components"]["unet"]["variants"]["cpu"]
        variant["file"] = name
        variant["files"][name] = {"sha256": "0" * 64, "bytes": 1}  # a size that differs: the old check printed the real one
    return mutate


def _tokenizer_file(name):
    return lambda data: data["tokenizers"]["text_encoder"]["files"].update({name: {"sha256": "0" * 64, "bytes": 1}})


def _link_out(engine_dir, outside):
    (engine_dir / "link.onnx").symlink_to(outside)


def _folder_link_out(engine_dir, outside):
    (engine_dir / "tokenizer" / "up").symlink_to(outside.parent, target_is_directory=True)


@pytest.mark.parametrize(
    "prepare, mutate, fragment",
    [
        (None, _variant_file("/etc/hostname"), "not a plain relative path"),
        (None, _variant_file("../secret.bin"), "not a plain relative path"),
        (None, _tokenizer_file("tokenizer/../../secret.bin"), "not a plain relative path"),
        (_link_out, _variant_file("link.onnx"), "leads out of the engine dir"),
        (_folder_link_out, _tokenizer_file("tokenizer/up/secret.bin"), "leads out of the engine dir"),
        (None, _variant_file("tokenizer/vocab.json"), "top level"),  # inside, but not where a backend looks for it
    ],
    ids=["variant-absolute", "variant-dotdot", "tokenizer-dotdot", "variant-link-out", "folder-link-out", "variant-nested"],
)
def test_paths_leaving_the_engine_dir_are_refused_at_read(engine_copy, outside, prepare, mutate, fragment):
    if prepare:
        prepare(engine_copy, outside)
    _rewrite(engine_copy, mutate)
    with pytest.raises(EngineError, match=fragment) as raised:
        read_manifest(engine_copy)
    assert str(OUTSIDE_SIZE) not in str(raised.value) and "bytes" not in str(raised.value)
    completed = run_cli("info", engine_copy, "--verify")
    assert_clean_error(completed, fragment)
    assert str(OUTSIDE_SIZE) not in completed.stderr


def test_a_link_out_reads_the_same_whether_its_target_exists(engine_copy, outside):
    """The refusal says nothing about the outside file: not its size, not even whether it is there."""
    (engine_copy / "present.onnx").symlink_to(outside)
    (engine_copy / "absent.onnx").symlink_to(outside.parent / "no-such-file")
    messages = []
    for name in ("present.onnx", "absent.onnx"):
        _rewrite(engine_copy, _variant_file(name))
        with pytest.raises(EngineError) as raised:
            read_manifest(engine_copy)
        messages.append(str(raised.value).replace(name, "NAME"))
        _rewrite(engine_copy, lambda data: data["components"]["unet"]["variants"]["cpu"]["files"].pop(name))
    assert messages[0] == messages[1] and "leads out of the engine dir" in messages[0]


def test_a_link_out_made_after_reading_is_refused_at_use(engine_copy, outside):
    """Manifest.path confines at use too: the file checks never stat (nor report on) what a link points to outside."""
    manifest = read_manifest(engine_copy)
    (engine_copy / "vae_decoder.onnx").unlink()
    (engine_copy / "vae_decoder.onnx").symlink_to(outside)
    with pytest.raises(EngineError, match="leads out of the engine dir") as raised:
        manifest.verify_files(full=False)
    assert str(OUTSIDE_SIZE) not in str(raised.value)
    with pytest.raises(EngineError, match="leads out of the engine dir"):
        manifest.path("vae_decoder.onnx")


@pytest.mark.parametrize("variant_file, fragment", [("../unet.cpu.onnx", "not a plain relative path"),
                                                    ("unet.link.onnx", "leads out of the engine dir")])
def test_backend_loads_variants_only_from_inside_the_engine_dir(engine_copy, tmp_path, variant_file, fragment):
    """The CPU backend resolves a variant through the same gate, even for a ComponentInfo that read_manifest did not check."""
    for name in ("unet.cpu.onnx", "unet.cpu.onnx.data"):  # a loadable graph outside the engine dir
        shutil.copy(engine_copy / name, tmp_path / name)
    (engine_copy / "unet.link.onnx").symlink_to(tmp_path / "unet.cpu.onnx")
    info = read_manifest(engine_copy).components["unet"]
    backend = get_backend("cpu")
    backend.load(info, engine_copy / info.file)  # the variant as exported loads (it was made here, so it is the one used)
    crafted = dataclasses.replace(info, variants={"cpu": {**info.variants["cpu"], "file": variant_file}})
    with pytest.raises(EngineError, match=fragment):
        backend.load(crafted, engine_copy / info.file)


def test_links_inside_the_engine_dir_and_a_linked_engine_dir_still_load(engine_copy, tmp_path):
    """Confinement compares real paths: a link within the dir, or to the dir itself, is fine."""
    vocab = engine_copy / "tokenizer" / "vocab.json"
    vocab.rename(vocab.with_name("vocab.stored.json"))
    vocab.symlink_to("vocab.stored.json")
    (engine_copy / "graphs").mkdir()
    (engine_copy / "vae_decoder.onnx").rename(engine_copy / "graphs" / "vae_decoder.onnx")
    (engine_copy / "vae_decoder.onnx").symlink_to(os.path.join("graphs", "vae_decoder.onnx"))
    current = tmp_path / "current"
    current.symlink_to(engine_copy, target_is_directory=True)
    read_manifest(current).verify_files(full=True)
    result = Pipeline.load(current, verify="full").generate(GenerationRequest(prompt="a boat", steps=2))
    assert result.images.shape == (1, 64, 64, 3) and np.isfinite(result.latents).all()
