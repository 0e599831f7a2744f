"""The engine dir: static shapes, hashes and parity in the manifest, atomic writes, refusals before work."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from sdfast.errors import ConfigError, ExportError
from sdfast.export.build import ExportRequest, check_request, export_engine
from sdfast.runtime.manifest import FORMAT_VERSION, read_manifest, sha256_file


def test_manifest_describes_every_component(tiny_engine):
    manifest = read_manifest(tiny_engine)
    data = manifest.data
    assert data["format_version"] == FORMAT_VERSION
    assert {name: (c.role, c.optional) for name, c in manifest.components.items()} == {
        "text_encoder": ("text_encoder", False), "unet": ("denoiser", False), "vae_decoder": ("vae_decoder", False),
        "vae_encoder": ("vae_encoder", True)}
    assert data["family"] == "sd15" and set(manifest.tokenizers) == {"text_encoder"}
    assert data["source"]["fingerprint"].startswith("sha256:") and data["source"]["random_weights"] is True
    assert manifest.latent == {"channels": 4, "factor": 8, "scaling_factor": pytest.approx(0.18215), "shift_factor": 0.0}
    assert manifest.prediction_type == "epsilon"
    for key in ("torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        assert data["libraries"][key]
    geometry = data["geometry"]
    assert (geometry["height"], geometry["width"], geometry["batch"], geometry["unet_batch"]) == (64, 64, 1, 2)
    for name, component in manifest.components.items():
        entry = data["components"][name]
        assert entry["precision"] == "fp32" and entry["opset"] >= 17
        for relative, info in component.files.items():
            assert sha256_file(tiny_engine / relative) == info["sha256"]
        parity = entry["parity"]
        assert parity["passed"] and parity["max_rel"] <= parity["tolerance_rel"] and parity["max_abs"] >= 0


def test_onnx_graphs_are_static_but_for_the_prompt_length(tiny_engine):
    manifest = read_manifest(tiny_engine)
    assert manifest.data["dynamic_dims"] == {"text_tokens": {"multiple_of": 77, "min": 77, "max": 77 * 8}}
    for component in manifest.components.values():
        graph = onnx.load(str(tiny_engine / component.file)).graph
        declared = {t.name: t.shape for t in component.inputs + component.outputs}
        for value in list(graph.input) + list(graph.output):
            dims = value.type.tensor_type.shape.dim
            expected = declared[value.name]
            for dim, size in zip(dims, expected, strict=True):
                if isinstance(size, str):  # only the U-Net's prompt tokens are dynamic
                    assert (component.name, value.name, size) == ("unet", "encoder_hidden_states", "text_tokens")
                    assert not dim.HasField("dim_value")
                else:
                    assert dim.HasField("dim_value") and dim.dim_value == size, f"{component.name}.{value.name}"


def test_max_prompt_chunks_is_checked(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="max prompt chunks"):
        check_request(ExportRequest(model=str(tiny_model), out=tmp_path / "f", max_prompt_chunks=0))


def test_unet_batch_follows_guidance(tiny_engine_batch2_unguided):
    manifest = read_manifest(tiny_engine_batch2_unguided)
    assert manifest.components["unet"].inputs[0].shape == (2, 4, 8, 8)  # batch B without guidance
    assert manifest.components["text_encoder"].inputs[0].shape == (2, 77)
    assert manifest.components["vae_decoder"].outputs[0].shape == (2, 3, 64, 64)
    assert manifest.data["source"]["random_weights"] is False  # a folder passed by path is the user's model


def test_non_square_size_into_new_directories(tiny_model, tmp_path):
    out = tmp_path / "new" / "dirs" / "e"
    manifest = read_manifest(export_engine(ExportRequest(model=str(tiny_model), out=out, height=32, width=48, max_prompt_chunks=2)))
    assert manifest.components["unet"].inputs[0].shape == (2, 4, 4, 6)  # latents 32/8 x 48/8
    assert manifest.components["vae_decoder"].outputs[0].shape == (1, 3, 32, 48)
    assert manifest.data["dynamic_dims"]["text_tokens"] == {"multiple_of": 77, "min": 77, "max": 154}
    assert manifest.geometry["max_text_chunks"] == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"height": 60}, "multiple of 8"),
        ({"width": 0}, "multiple of 8"),
        ({"batch": 0}, "at least 1"),
        ({"precision": "int3"}, "precision"),
    ],
)
def test_impossible_shapes_are_refused_before_work(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        check_request(ExportRequest(model="tiny", out=tmp_path / "e", **changes))


def test_existing_out_needs_force(tiny_engine):
    with pytest.raises(ConfigError, match="--force"):
        check_request(ExportRequest(model="tiny", out=tiny_engine))


def test_failed_export_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch):
    """A parity failure (a tolerance no float export can meet) aborts the export; no dir or staging remains."""
    from sdfast.export import recipe as recipe_module

    original = recipe_module.Recipe.component

    def strict(self, name, dims, precision, **options):
        component = original(self, name, dims, precision, **options)
        return dataclasses.replace(component, tolerance=1e-30) if name == "unet" else component

    monkeypatch.setattr(recipe_module.Recipe, "component", strict)
    out = tmp_path / "engine"
    with pytest.raises(ExportError, match="unet: ONNX output differs from PyTorch"):
        export_engine(ExportRequest(model=str(tiny_model), out=out))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch):
    from sdfast.export import onnx_export

    real_export = onnx_export.export_to_onnx

    def interrupt_at_unet(module, recipe, *args, **kwargs):
        if recipe.name == "unet":
            raise KeyboardInterrupt
        return real_export(module, recipe, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_to_onnx", interrupt_at_unet)
    with pytest.raises(KeyboardInterrupt):
        export_engine(ExportRequest(model=str(tiny_model), out=tmp_path / "engine"))
    assert list(tmp_path.iterdir()) == []


def test_force_refuses_to_replace_what_is_not_an_engine_dir(tiny_model, tmp_path):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not an engine dir"):
        check_request(ExportRequest(model="tiny", out=documents, force=True))
    with pytest.raises(ConfigError, match="overlaps the model folder"):
        check_request(ExportRequest(model=str(tiny_model), out=tiny_model / "engine", force=True))
    assert (documents / "thesis.txt").read_text() == "precious"


def test_force_replaces_an_engine_dir(tiny_model, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # an (old) engine dir
    (out / "stale.txt").write_text("old")
    export_engine(ExportRequest(model=str(tiny_model), out=out, force=True, height=32, width=32))
    assert not (out / "stale.txt").exists() and read_manifest(out).geometry["height"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def _folder_with_pipeline_class(tiny_model, tmp_path, pipeline_class: str):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    return folder


def test_the_family_comes_from_the_pipeline_class_and_an_unknown_one_is_refused(tiny_model, tmp_path):
    from tests.conftest import run_cli, visible_lines

    folder = _folder_with_pipeline_class(tiny_model, tmp_path, "KandinskyV22Pipeline")
    done = run_cli("export", "--model", folder, "--out", tmp_path / "engine")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert visible_lines(done.stderr)[-1] == (
        f"sdfast export: error: '{folder}' holds a KandinskyV22Pipeline; sdfast exports StableDiffusionPipeline, "
        "StableDiffusionInpaintPipeline, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, "
        "StableDiffusion3Pipeline (or name the family with --family: sd15, sdxl, sd3)")
    done = run_cli("export", "--model", folder, "--out", tmp_path / "engine", "--family", "sd9")
    assert visible_lines(done.stderr)[-1] == "sdfast export: error: --family 'sd9' is not a model family sdfast exports (sd15, sdxl, sd3)"
    assert not (tmp_path / "engine").exists()


def test_family_override_exports_a_folder_of_another_pipeline_class(tiny_model, tmp_path):
    folder = _folder_with_pipeline_class(tiny_model, tmp_path, "MyFineTunedStableDiffusionPipeline")
    out = export_engine(ExportRequest(model=str(folder), out=tmp_path / "engine", family="sd15", cpu_variant=False))
    manifest = read_manifest(out)
    assert manifest.family == "sd15" and manifest.components["unet"].role == "denoiser"


def test_a_failed_graph_write_is_one_line_naming_the_component_and_the_disk(tiny_model, tmp_path, monkeypatch):
    """onnxruntime's writer failing (as on a full disk: 'Failed to write external initializers') is an ExportError
    naming the component, with the free space when it is low, never a traceback; nothing is left behind."""
    import shutil
    from collections import namedtuple

    from sdfast.errors import ExportError
    from sdfast.export import component_export, onnx_export

    def failing_write(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : graph.cc:5436 AddExternalInitializersToGraphProtoImpl\n"
                           "Failed to write external initializers to file")

    monkeypatch.setattr(onnx_export, "optimize_offline", failing_write)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 2**30, 99 * 2**30, 2**30))
    with pytest.raises(ExportError, match=r"^text_encoder: optimizing and writing its graphs failed: Failed to write external "
                                          r"initializers to file \(1\.0 GiB free in .*: the disk is full\?\)$"):
        export_engine(ExportRequest(model=str(tiny_model), out=tmp_path / "engine", cpu_variant=False))
    assert not (tmp_path / "engine").exists() and not list(tmp_path.glob(".engine.partial-*"))
    assert component_export.disk_hint(tmp_path) != ""
