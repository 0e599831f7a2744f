"""LoRAs at run time: kohya/A1111 (LoCon) and diffusers/PEFT files merged into the engine's weights without re-export,
against diffusers' load_lora_weights + fuse_lora on the same random model and LoRAs."""
import hashlib
import json
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from sdfast.errors import RequestError
from sdfast.runtime.images import psnr
from sdfast.runtime.lora.library import LoraLibrary
from sdfast.runtime.lora.prompt_tags import LoraUse
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import diffusers_reference, run_cli
from tests.lora_files import kohya_lora, peft_lora

PROMPT, NEGATIVE, STEPS = "a red apple on a table", "blurry", 8


@pytest.fixture(scope="module")
def reference(tiny_model):
    return diffusers_reference(tiny_model)


@pytest.fixture(scope="module")
def lora_dir(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    kohya_lora(reference, folder / "kohya_locon.safetensors", seed=1)
    (folder / "styles").mkdir()  # LoRAs in subfolders are found by name too, as A1111 finds them
    kohya_lora(reference, folder / "styles" / "kohya_plain.safetensors", seed=2, locon=False, dtype=np.float32)
    peft_lora(reference, folder, "peft_lora", seed=3)
    return folder


@pytest.fixture(scope="module")
def pipeline(tiny_engine, lora_dir):
    pipe = Pipeline.load(tiny_engine)
    pipe.loras.library = LoraLibrary(lora_dir)
    return pipe


def ours(pipeline, prompt=PROMPT, loras=()):
    return pipeline.generate(GenerationRequest(prompt, NEGATIVE, steps=STEPS, cfg_scale=7.5, seed=42, loras=tuple(loras)))


def theirs(tiny_model, pipeline, lora_dir, adapters: dict[str, float]):
    """diffusers with each LoRA loaded as an adapter at its weight and fused into the weights (fuse_lora)."""
    reference = diffusers_reference(tiny_model)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    for name in adapters:
        path = next(lora_dir.rglob(f"{name}.safetensors"))
        reference.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    if adapters:
        reference.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
        reference.fuse_lora(adapter_names=list(adapters), lora_scale=1.0)
    images = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
                       generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
    return (images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def base_image(pipeline):
    return ours(pipeline).images


@pytest.mark.parametrize("name, weight, how", [
    ("kohya_locon", 0.8, "prompt tag"),  # kohya LoCon: attention, feed-forward and resnet convolutions, fp16 file
    ("kohya_plain", -0.7, "request"),  # a negative weight
    ("peft_lora", 0.6, "request"),  # diffusers' own save of a PEFT adapter, lora_alpha in its metadata
])
def test_lora_matches_diffusers_fuse_lora(pipeline, tiny_model, lora_dir, base_image, name, weight, how):
    if how == "prompt tag":
        result = ours(pipeline, f"{PROMPT} <lora:{name}:{weight}>")
    else:
        result = ours(pipeline, loras=[LoraUse(name, weight, weight)])
    expected = theirs(tiny_model, pipeline, lora_dir, {name: weight})
    assert psnr(result.images, expected) >= 40.0
    assert psnr(result.images, base_image) < 35.0, "the LoRA must change the image for the comparison to mean anything"


def test_two_loras_summed_match_diffusers_adapters(pipeline, tiny_model, lora_dir, base_image):
    result = ours(pipeline, f"{PROMPT} <lora:kohya_locon:0.5>", [LoraUse("peft_lora", -0.4, -0.4)])
    expected = theirs(tiny_model, pipeline, lora_dir, {"kohya_locon": 0.5, "peft_lora": -0.4})
    assert psnr(result.images, expected) >= 40.0 and psnr(result.images, base_image) < 35.0


def test_switching_back_restores_the_stored_weights_and_the_infotext_names_the_hashes(pipeline, base_image, lora_dir):
    with_lora = ours(pipeline, f"{PROMPT} <lora:kohya_locon:0.8>")
    path = lora_dir / "kohya_locon.safetensors"
    data = path.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    a1111_hash = hashlib.sha256(data[8 + header:]).hexdigest()[:12]  # A1111's hash of a safetensors LoRA
    parameters = with_lora.parameters[0]
    assert parameters.startswith(f"{PROMPT} <lora:kohya_locon:0.8>\n") and f'Lora hashes: "kohya_locon: {a1111_hash}"' in parameters
    plain = ours(pipeline)
    assert np.array_equal(plain.images, base_image) and "Lora hashes" not in plain.parameters[0]
    assert pipeline.loras.patched == set()
    again = ours(pipeline, loras=[LoraUse("kohya_locon", 0.8, 0.8)])
    assert np.array_equal(again.images, with_lora.images)
    assert "<lora:kohya_locon:0.8>" in again.parameters[0]  # the infotext's prompt carries the LoRA as A1111 reads it back


def test_separate_text_encoder_and_unet_weights(pipeline, base_image):
    unet_only = ours(pipeline, f"{PROMPT} <lora:kohya_locon:0:0.8>").images
    te_only = ours(pipeline, f"{PROMPT} <lora:kohya_locon:te=0.8:unet=0>").images
    both = ours(pipeline, f"{PROMPT} <lora:kohya_locon:0.8>").images
    assert psnr(unet_only, base_image) < 35 and psnr(te_only, base_image) < 35
    assert not np.array_equal(unet_only, both) and not np.array_equal(te_only, both)


def _write(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def bad_dir(lora_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-loras")
    good = (lora_dir / "kohya_locon.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "not_safetensors.safetensors").write_bytes(b"\x00" * 64)
    _write(folder / "unknown_format.safetensors", {"model.diffusion_model.input_blocks.1.weight": np.zeros((4, 4), np.float32)})
    _write(folder / "loha.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": np.zeros((4, 4), np.float32)})
    other_base = {  # a LoRA for a model with a wider cross-attention (SD 2.x's 1024 on a 768 or 32-wide model)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": np.zeros((4, 1024), np.float32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": np.zeros((32, 4), np.float32)}
    _write(folder / "other_base.safetensors", other_base)
    _write(folder / "missing_module.safetensors", {"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), np.float32),
                                                   "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": np.zeros((32, 4), np.float32)})
    (folder / "kohya_locon.safetensors").write_bytes(good)
    return folder


@pytest.mark.parametrize("prompt, loras, message", [
    (PROMPT, [LoraUse("truncated")], "does not fit its byte range"),
    (PROMPT, [LoraUse("not_safetensors")], "is not a safetensors file"),
    (PROMPT, [LoraUse("unknown_format")], "unknown format"),
    (PROMPT, [LoraUse("loha")], "is LoHa"),
    (PROMPT, [LoraUse("other_base")], "for another base model"),
    (PROMPT, [LoraUse("missing_module")], "for another base model"),
    (PROMPT, [LoraUse("nowhere")], "unknown LoRA 'nowhere'"),
    (f"{PROMPT} <lora:../kohya_locon:1>", [], "not a path"),
    (f"{PROMPT} <lora:kohya_locon:25>", [], "outside -10 .. 10"),
    (f"{PROMPT} <hypernet:kohya_locon:1>", [], "<hypernet:...> networks are not supported"),
])
def test_bad_loras_are_refused_and_leave_the_engine_unpatched(tiny_engine, bad_dir, base_image, prompt, loras, message):
    pipe = Pipeline.load(tiny_engine)
    pipe.loras.library = LoraLibrary(bad_dir)
    ours(pipe, f"{PROMPT} <lora:kohya_locon:0.8>")  # a LoRA applied before the bad request
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ours(pipe, prompt, loras)
    assert len(pipe.loras.files) == 1, "a refused LoRA leaves the engines with the LoRAs they had"
    assert np.array_equal(ours(pipe).images, base_image)


def test_too_large_lora_is_refused(tiny_engine, lora_dir, monkeypatch):
    pipe = Pipeline.load(tiny_engine)
    pipe.loras.library = LoraLibrary(lora_dir)
    monkeypatch.setattr("sdfast.runtime.lora.library.MAX_LORA_BYTES", 1000)
    with pytest.raises(RequestError, match="LoRA file 'peft_lora.safetensors' is .* MiB, over the .* MiB limit"):
        ours(pipe, loras=[LoraUse("peft_lora")])


def test_generate_cli_applies_loras_and_refuses_bad_ones_in_one_line(tiny_engine, lora_dir, tmp_path, base_image):
    from PIL import Image

    out = tmp_path / "lora.png"
    done = run_cli("generate", tiny_engine, PROMPT, "--negative", NEGATIVE, "--steps", STEPS, "--seed", 42,
                   "--lora", "kohya_locon:0.8", "--lora-dir", lora_dir, "-o", out, "--quiet")
    assert done.returncode == 0, done.stderr
    image = Image.open(out)
    assert 'Lora hashes: "kohya_locon: ' in image.info["parameters"]
    assert psnr(np.asarray(image)[None], base_image) < 35
    for args, message in [(["--lora", "kohya_locon"], "no LoRA directory was given"),
                          (["--lora", "absent", "--lora-dir", lora_dir], "unknown LoRA 'absent'"),
                          (["--lora", "kohya_locon:x", "--lora-dir", lora_dir], "is not a number"),
                          (["--lora-dir", tmp_path / "nope"], "is not a directory")]:
        refused = run_cli("generate", tiny_engine, PROMPT, "--steps", 2, "-o", tmp_path / "no.png", "--quiet", *args)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and message in lines[0], (args, refused.stderr)
        assert not (tmp_path / "no.png").exists()


def test_parameter_map_places_every_weight_of_the_portable_graph(tiny_engine):
    manifest = json.loads((tiny_engine / "manifest.json").read_text())
    for component in ("unet", "text_encoder"):
        entry = manifest["components"][component]["parameter_map"]
        for graph, summary in entry["graphs"].items():
            assert summary["of"] > 0
            if graph == manifest["components"][component]["file"]:
                assert summary["mapped"] == summary["of"], (component, graph, summary)


def test_export_fuses_a_lora_as_the_runtime_applies_it(pipeline, lora_dir, tmp_path, base_image):
    out = tmp_path / "fused"
    done = run_cli("export", "--model", "tiny", "--out", out, "--lora", f"{lora_dir / 'kohya_locon.safetensors'}:0.8", "--no-cpu-variant")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (record,) = manifest["source"]["fused_loras"]
    assert record["name"] == "kohya_locon" and record["scale"] == 0.8 and record["weights"] > 0
    fused = Pipeline.load(out)
    assert fused.manifest.model_hash != pipeline.manifest.model_hash  # another model, as the infotext says
    patched = ours(pipeline, f"{PROMPT} <lora:kohya_locon:0.8>").images
    assert psnr(ours(fused).images, patched) >= 40 and psnr(patched, base_image) < 35
    for args, message in [(["--lora", tmp_path / "absent.safetensors"], "no such file"),
                          (["--lora", f"{lora_dir / 'kohya_locon.safetensors'}:50"], "outside -10 .. 10")]:
        refused = run_cli("export", "--model", "tiny", "--out", tmp_path / "never", *args)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and message in lines[-1] and not (tmp_path / "never").exists(), refused.stderr


def test_portable_graphs_take_loras_as_diffusers_fuses_them(tiny_model, lora_dir, tmp_path_factory):
    """Without the CPU variant, onnxruntime optimizes the portable graph at load (NCHWc, fusions): the merged weights
    must reach it through those rewrites too."""
    from sdfast.export.build import ExportRequest, export_engine

    engine = export_engine(ExportRequest(model="tiny", out=tmp_path_factory.mktemp("portable") / "tiny", cpu_variant=False))
    pipe = Pipeline.load(engine)
    pipe.loras.library = LoraLibrary(lora_dir)
    result = ours(pipe, f"{PROMPT} <lora:kohya_locon:0.8>").images
    assert psnr(result, theirs(tiny_model, pipe, lora_dir, {"kohya_locon": 0.8})) >= 40.0
    assert psnr(result, ours(pipe).images) < 35.0


def test_fp16_engines_take_loras_as_fp32_ones_within_fp16_rounding(tiny_fp16_engine, pipeline, lora_dir):
    """The merged fp16 weights reach the graph through onnxruntime's fp16 casts (they stand in for the data file)."""
    pipe = Pipeline.load(tiny_fp16_engine)
    pipe.loras.library = LoraLibrary(lora_dir)
    plain16 = ours(pipe).images
    lora16 = ours(pipe, f"{PROMPT} <lora:kohya_locon:0.8>").images
    lora32 = ours(pipeline, f"{PROMPT} <lora:kohya_locon:0.8>").images
    assert psnr(lora16, lora32) >= 35.0 and psnr(lora16, plain16) < 30.0


@pytest.mark.parametrize("prepacking", [True, False])
def test_onnxruntime_copies_the_merged_weights_so_they_can_go(tiny_engine, monkeypatch, prepacking):
    """The backend drops its merged arrays once the session is made (SDXL's would otherwise stay twice in memory):
    that is safe only while onnxruntime copies them, which this checks on each layout the CPU variant holds, also
    with prepacking off (where a kernel reading the array in place would show)."""
    from sdfast.runtime.backends import get_backend
    from sdfast.runtime.manifest import read_manifest

    manifest = read_manifest(tiny_engine)
    info = manifest.components["unet"]
    backend = get_backend("cpu")
    if not prepacking:
        plain = backend.session_options

        def unpacked(optimize=True):
            options = plain(optimize)
            options.add_session_config_entry("session.disable_prepacking", "1")
            return options

        monkeypatch.setattr(backend, "session_options", unpacked)
    graph = backend.graph_for(info)[0]
    places = json.loads((tiny_engine / "unet.parameters.json").read_text())["graphs"][graph]
    chosen = {}
    for place in places.values():
        chosen.setdefault(place["layout"], place)
    assert {"transpose", "identity"} <= set(chosen), chosen.keys()
    overrides = {place["initializer"]: np.full(place["shape"], 0.01, np.float32) for place in chosen.values()}
    engine = backend.load(info, manifest.path(info.file), overrides=overrides)
    rng = np.random.default_rng(0)
    feeds = {spec.name: rng.standard_normal([d if isinstance(d, int) else 77 for d in spec.shape]).astype(np.float32)
             for spec in info.inputs}
    before = engine.run(feeds)[0]
    for array in overrides.values():
        array[...] = 123.0
    assert np.array_equal(engine.run(feeds)[0], before)


def test_a_switch_rebuilds_only_the_components_whose_loras_change(pipeline):
    ours(pipeline, f"{PROMPT} <lora:kohya_locon:0.8>")
    unet, text_encoder = pipeline.engines["unet"], pipeline.engines["text_encoder"]
    ours(pipeline, f"{PROMPT} <lora:kohya_locon:0.5:0.8>")  # the text encoders' multiplier only
    assert pipeline.engines["unet"] is unet and pipeline.engines["text_encoder"] is not text_encoder
    ours(pipeline, f"{PROMPT} <lora:kohya_locon:0:0.8>")  # the text encoders back to their stored weights
    assert pipeline.engines["unet"] is unet and pipeline.loras.patched == {"unet"}


def test_a_session_that_fails_to_build_mid_switch_leaves_the_stored_weights(tiny_engine, lora_dir, base_image, monkeypatch):
    from sdfast.errors import EngineError

    pipe = Pipeline.load(tiny_engine)
    pipe.loras.library = LoraLibrary(lora_dir)
    real_load = pipe.loras.backend.load

    def failing(info, path, overrides=None):
        if overrides and info.name == "unet":  # the text encoder was already rebuilt with the LoRA by then
            raise EngineError("unet: out of memory (simulated)")
        return real_load(info, path, overrides=overrides)

    monkeypatch.setattr(pipe.loras.backend, "load", failing)
    with pytest.raises(EngineError, match="simulated"):
        ours(pipe, f"{PROMPT} <lora:kohya_locon:0.8>")
    assert pipe.loras.patched == set() and pipe.loras.files == []
    assert np.array_equal(ours(pipe).images, base_image)
    monkeypatch.setattr(pipe.loras.backend, "load", real_load)
    assert psnr(ours(pipe, f"{PROMPT} <lora:kohya_locon:0.8>").images, base_image) < 35


def test_formats_parse_the_attention_processor_keys_and_refuse_malformed_tensors(tmp_path):
    from sdfast.runtime.lora.formats import parse_lora
    from sdfast.runtime.lora.safetensors_file import read_tensors

    targets = {"unet.down.attn1.to_q.weight": (8, 6), "unet.down.attn1.to_out.0.weight": (8, 8)}
    rng = np.random.default_rng(0)
    tensors = {"unet.down.attn1.processor.to_q_lora.down.weight": rng.standard_normal((2, 6)),
               "unet.down.attn1.processor.to_q_lora.up.weight": rng.standard_normal((8, 2)),
               "unet.down.attn1.processor.to_out_lora.down.weight": rng.standard_normal((2, 8)),
               "unet.down.attn1.processor.to_out_lora.up.weight": rng.standard_normal((8, 2))}
    updates = parse_lora("old", tensors, targets)
    assert set(updates) == set(targets)
    np.testing.assert_allclose(updates["unet.down.attn1.to_q.weight"].delta((8, 6)),
                               tensors["unet.down.attn1.processor.to_q_lora.up.weight"] @ tensors["unet.down.attn1.processor.to_q_lora.down.weight"])
    with pytest.raises(RequestError, match="alpha of .* is not one number"):
        parse_lora("x", {"lora_unet_down_attn1_to_q.lora_down.weight": np.ones((2, 6)), "lora_unet_down_attn1_to_q.lora_up.weight": np.ones((8, 2)),
                         "lora_unet_down_attn1_to_q.alpha": np.ones(3)}, targets)
    header = json.dumps({"w": {"dtype": "F32", "shape": [-2, 3], "data_offsets": [0, 0]}}).encode()
    (tmp_path / "negative.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(RequestError, match="no valid dtype, shape or data_offsets"):
        read_tensors(tmp_path / "negative.safetensors", 2**30)
