"""Full verification remembers what it hashed: an unchanged file is not hashed again, a changed one always is."""
from __future__ import annotations

import shutil

import pytest

from sdfast.errors import EngineError
from sdfast.runtime import manifest as manifest_module
from sdfast.runtime import verified_cache
from sdfast.runtime.manifest import read_manifest


@pytest.fixture()
def engine_copy(tiny_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("SDFAST_CACHE", str(tmp_path / "cache"))
    return shutil.copytree(tiny_engine, tmp_path / "engine")


def _counting(monkeypatch) -> list:
    hashed, real = [], manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path, *a: hashed.append(path.name) or real(path, *a))
    return hashed


def test_an_unchanged_file_is_hashed_once_and_a_changed_one_again(engine_copy, monkeypatch):
    monkeypatch.setattr(verified_cache, "RACY_NS", 0)  # the files were just written: trust records at once
    hashed = _counting(monkeypatch)
    manifest = read_manifest(engine_copy)
    files = {name: entry for name, entry in manifest.listed_files().items() if name.startswith("unet")}
    manifest.verify_files(full=True, files=files)
    assert sorted(hashed) == sorted(files) and verified_cache.cache_path().is_file()
    hashed.clear()
    read_manifest(engine_copy).verify_files(full=True, files=files)
    assert hashed == []  # remembered
    read_manifest(engine_copy).verify_files(full=True, files=files, remembered=False)
    assert sorted(hashed) == sorted(files)  # an explicit check hashes again
    hashed.clear()
    target = engine_copy / "unet.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, new bytes: the ctime changes
    target.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="'unet.onnx' does not match its sha256"):
        read_manifest(engine_copy).verify_files(full=True, files=files)
    assert hashed == ["unet.onnx"]


def test_a_file_changed_just_before_its_hash_is_hashed_every_time(engine_copy, monkeypatch):
    hashed = _counting(monkeypatch)
    manifest = read_manifest(engine_copy)
    files = {"scheduler/scheduler_config.json": manifest.listed_files()["scheduler/scheduler_config.json"]}
    for _ in range(2):
        manifest.verify_files(full=True, files=files)
    assert hashed == ["scheduler_config.json"] * 2  # racy: copied a moment ago, so never trusted yet


def test_an_unreadable_cache_is_ignored_and_replaced(engine_copy, monkeypatch):
    verified_cache.cache_path().parent.mkdir(parents=True)
    verified_cache.cache_path().write_text("not json")
    manifest = read_manifest(engine_copy)
    manifest.verify_files(full=True, files={"scheduler/scheduler_config.json": manifest.listed_files()["scheduler/scheduler_config.json"]})
    assert verified_cache.VerifiedFiles().records  # rewritten with the file it hashed
