"""SD3: a small random SD3.5 Medium-shaped model (dual attention, no T5) exported and run by sdfast equals diffusers'
StableDiffusion3Pipeline with text_encoder_3=None, for every flow sampler, an empty negative prompt and clip skip; and
what SD3 does not take yet is refused by name."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdfast.errors import ConfigError, RequestError
from sdfast.runtime.images import psnr
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from sdfast.sampling.registry import FLOW_SAMPLERS
from tests.conftest import run_cli, visible_lines
from tests.test_flow_samplers import REFERENCES

PROMPT, NEGATIVE, SIZE = "a lighthouse on a cliff at dawn", "blurry", 64


@pytest.fixture(scope="module")
def sd3_engine(sdfast_cache, tmp_path_factory):
    from sdfast.export.build import ExportRequest, export_engine

    return export_engine(ExportRequest(model="tiny-sd3", out=tmp_path_factory.mktemp("sd3-engines") / "tiny-sd3"))


@pytest.fixture(scope="module")
def pipeline(sd3_engine):
    return Pipeline.load(sd3_engine)


@pytest.fixture(scope="module")
def reference(sd3_engine):
    from sdfast.export.builtin import ensure_builtin

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
        ensure_builtin("tiny-sd3"), text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _expected(reference, sampler: str, seed: int = 7, **options) -> np.ndarray:
    """diffusers' image with the sampler's scheduler configured as SD3 users configure it (test_flow_samplers.REFERENCES)."""
    from sdfast.export.builtin import SD3_SCHEDULER_CONFIG

    cls_name, extra = REFERENCES[sampler]
    extra = {**extra, "flow_shift": SD3_SCHEDULER_CONFIG["shift"]} if "use_flow_sigmas" in extra else extra
    reference.scheduler = getattr(diffusers, cls_name).from_config({**SD3_SCHEDULER_CONFIG, **extra})
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": 6, "guidance_scale": 5.0, **options}
    images = reference(PROMPT, height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **options).images
    return (images * 255).round().astype(np.uint8)


def test_the_manifest_records_what_makes_it_sd3(sd3_engine, reference):
    manifest = read_manifest(sd3_engine)
    assert manifest.family == "sd3" and manifest.prediction_type == "flow_prediction"
    assert manifest.latent == {"channels": 16, "factor": 8, "scaling_factor": 1.5305, "shift_factor": 0.0609}
    transformer = manifest.components["transformer"]
    assert transformer.role == "denoiser" and manifest.denoiser == "transformer"
    assert [t.name for t in transformer.inputs] == ["sample", "timestep", "encoder_hidden_states", "pooled_projections", "layer_keep"]
    assert transformer.input("layer_keep").shape == (reference.transformer.config.num_layers,)
    # 77 CLIP tokens + 256 (zero) T5 tokens, T5's width; the pooled pair 32 + 32
    assert transformer.input("encoder_hidden_states").shape == (2, 77 + 256, reference.transformer.config.joint_attention_dim)
    assert transformer.input("pooled_projections").shape == (2, 64)
    assert json.loads((sd3_engine / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("sampler", list(FLOW_SAMPLERS))
def test_every_flow_sampler_matches_diffusers_on_sd3(pipeline, reference, sampler):
    expected = _expected(reference, sampler)
    spec = FLOW_SAMPLERS[sampler]
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=7, sampler=spec.a1111_name))
    assert result.images.std() > 10, "a flat image would make the comparison meaningless"
    assert psnr(result.images, expected) >= 40.0, sampler


def test_a_silent_negative_prompt_is_the_encoding_of_nothing(pipeline, reference):
    """SD3 has no force_zeros_for_empty_prompt: diffusers encodes "" for a missing negative prompt."""
    expected = _expected(reference, "euler", seed=3, negative_prompt=None)
    result = pipeline.generate(GenerationRequest(PROMPT, "", steps=6, cfg_scale=5.0, seed=3, sampler="Euler"))
    assert psnr(result.images, expected) >= 40.0


def test_clip_skip_is_diffusers_sd3_clip_skip_plus_one(pipeline, reference):
    """A1111's clip skip 2 is diffusers' clip_skip=1 (hidden_states[-3]); diffusers applies it to the prompt only."""
    expected = _expected(reference, "euler", seed=4, clip_skip=1)
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=4, sampler="Euler", clip_skip=2))
    assert psnr(result.images, expected) >= 40.0
    assert psnr(result.images, _expected(reference, "euler", seed=4)) < 35.0


def test_a_prompt_past_77_tokens_is_cut_as_diffusers_cuts_it_with_a_warning(pipeline, reference):
    long_prompt = ", ".join(["a red lighthouse on a rocky cliff"] * 12)
    images = reference(long_prompt, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE,
                       generator=torch.Generator("cpu").manual_seed(2), output_type="np").images
    result = pipeline.generate(GenerationRequest(long_prompt, NEGATIVE, steps=4, cfg_scale=5.0, seed=2, sampler="Euler"))
    assert psnr(result.images, (images * 255).round().astype(np.uint8)) >= 40.0
    assert any("longer than CLIP's 75 tokens" in warning and "were dropped" in warning for warning in result.warnings)


def _pipeline_of(reference, class_name: str):
    """The reference's components in another SD3 pipeline class (img2img, inpainting), with FlowMatch Euler."""
    from sdfast.export.builtin import SD3_SCHEDULER_CONFIG

    pipe = getattr(diffusers, class_name)(**{**reference.components, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("strength", [0.6, 0.85])
def test_img2img_matches_diffusers(pipeline, reference, images, strength):
    """StableDiffusion3Img2ImgPipeline: the image latents (shifted and scaled) flow-noised to the first time that runs,
    with its own rounding of steps x strength (6 x 0.6 runs 4 steps)."""
    from PIL import Image

    from sdfast.runtime.images import load_init_image

    expected = _pipeline_of(reference, "StableDiffusion3Img2ImgPipeline")(
        PROMPT, image=Image.open(images[0]), strength=strength, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(21), output_type="np").images
    init = load_init_image(images[0], SIZE, SIZE, [])
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=21, sampler="Euler", init_image=init,
                                                 strength=strength))
    assert result.images.std() > 10 and psnr(result.images, (expected * 255).round().astype(np.uint8)) >= 40.0


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_matches_diffusers(pipeline, reference, images, strength):
    """StableDiffusion3InpaintPipeline (16-channel transformer): after each step the known region is the image latents
    flow-noised to the next time."""
    from PIL import Image

    from sdfast.runtime.images import load_init_image, load_mask

    inpaint = _pipeline_of(reference, "StableDiffusion3InpaintPipeline")
    # diffusers 0.42's SD3 inpaint pipeline decodes latents / scaling_factor without adding the VAE's shift_factor back
    # (its txt2img and img2img pipelines add it): sdfast decodes as the VAE defines, so the reference gets the shift back.
    stock_decode, shift = inpaint.vae.decode, inpaint.vae.config.shift_factor
    inpaint.vae.decode = lambda latents, **options: stock_decode(latents + shift, **options)
    try:
        expected = inpaint(PROMPT, image=Image.open(images[0]), mask_image=Image.open(images[1]), strength=strength, negative_prompt=NEGATIVE,
                           num_inference_steps=6, guidance_scale=5.0, height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(4),
                           output_type="np").images
    finally:
        del inpaint.vae.decode  # the VAE is the reference's own: back to its class's method
    init, mask = load_init_image(images[0], SIZE, SIZE, []), load_mask(images[1], SIZE, SIZE, [])
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=4, sampler="Euler", init_image=init,
                                                 mask=mask, strength=strength))
    assert psnr(result.images, (expected * 255).round().astype(np.uint8)) >= 40.0


def test_what_sd3_does_not_take_is_refused_by_name(pipeline, sd3_engine, tmp_path):
    with pytest.raises(RequestError, match="sampler 'Euler a' does not apply to a flow-matching model"):
        pipeline.generate(GenerationRequest(PROMPT, steps=2, sampler="Euler a"))
    done = run_cli("export", "--model", "tiny-sd3", "--height", "72", "--width", "64", "--out", tmp_path / "e")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert visible_lines(done.stderr)[-1] == "sdfast export: error: height 72 is not a multiple of 16, which the sd3 family needs"
    assert not (tmp_path / "e").exists()


def test_a_vp_family_refuses_a_flow_scheduler_and_sd3_refuses_a_vp_one(sdfast_cache, tmp_path):
    import shutil

    from sdfast.export.builtin import ensure_builtin
    from sdfast.export.families import sd3

    folder = tmp_path / "sd3-with-vp-scheduler"
    shutil.copytree(ensure_builtin("tiny-sd3"), folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(ConfigError, match="EulerDiscreteScheduler \\(a VP \\(DDPM\\) schedule\\), but this model family samples with flow-matching"):
        sd3.load(folder)


def test_serve_runs_sd3_for_unchanged_a1111_and_openai_clients(sd3_engine):
    """webuiapi and the openai client as users call them: the engine's own sampler (flow Euler) where a request is
    silent, its flow samplers listed, A1111's Euler a refused with a 422 naming the field."""
    import base64
    import io

    httpx = pytest.importorskip("httpx")
    webuiapi = pytest.importorskip("webuiapi")
    openai = pytest.importorskip("openai")
    from PIL import Image

    from tests.test_serve import Server

    server = Server(sd3_engine)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        assert [m["family"] for m in api.get_sd_models()] == ["sd3"]
        assert [s["name"] for s in api.get_samplers()] == ["Euler", "Heun", "DPM++ 2M", "UniPC"]
        pipeline = Pipeline.load(sd3_engine)
        plain = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, steps=6, cfg_scale=5.0, width=SIZE, height=SIZE,
                            sampler_name="DPM++ 2M")
        expected = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=3, sampler="DPM++ 2M"))
        assert np.array_equal(np.asarray(plain.image), expected.images[0])

        silent = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 4, "steps": 5}, timeout=120)
        assert silent.status_code == 200, silent.text
        assert "Sampler: Euler," in silent.json()["info"]
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(silent.json()["images"][0]))))
        assert np.array_equal(image, pipeline.generate(GenerationRequest(PROMPT, steps=5, cfg_scale=7.0, seed=4, sampler="Euler")).images[0])

        wrong = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "sampler_name": "Euler a"}, timeout=60)
        assert wrong.status_code == 422 and "sampler_name" in wrong.text and "flow-matching" in wrong.text

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        answer = client.images.generate(prompt=PROMPT, n=1, size=f"{SIZE}x{SIZE}", response_format="b64_json")
        image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
        assert image.size == (SIZE, SIZE) and np.asarray(image).std() > 10
    finally:
        assert server.stop()


def test_bench_measures_the_sd3_transformer_on_sdfast_and_diffusers(sd3_engine, tmp_path):
    """sdfast bench times the transformer (the manifest's denoiser) with SD3's conditioning, and diffusers' SD3 pipeline;
    the effective GFLOP/s comes from the transformer's counted FLOPs."""
    from sdfast.bench.report import BenchRun

    out = tmp_path / "bench.json"
    done = run_cli("bench", sd3_engine, "--backends", "cpu,torch", "--repeat", "1", "--steps", "2", "--format", "json", "--out", out)
    assert done.returncode == 0, done.stderr
    (run,) = BenchRun.load(out)
    for backend in ("cpu", "torch"):
        for metric in ("text_encoder", "unet_step_cfg", "vae_decode", "end_to_end", "unet_gflops"):  # an engine dir: guided only
            row = run.value(backend, metric)
            assert row is not None and row.median > 0, (backend, metric)


def test_the_exported_transformer_is_the_stock_forward_with_skip_layers_as_data(reference, monkeypatch):
    """The export wrapper re-states SD3Transformer2DModel.forward with a layer mask: equal to the stock forward with
    every block kept, and to its skip_layers where the mask is zero (a diffusers change to the forward fails here)."""
    from sdfast.export.families import sd3
    from sdfast.export.families.sd3 import Transformer

    monkeypatch.setattr(sd3, "QUERY_SLICE", 100)  # 16 + 333 tokens: attention in 4 query slices, as at 1024x1024
    stock_attention = torch.nn.functional.scaled_dot_product_attention
    net = reference.transformer
    wrapper = Transformer(type("Model", (), {"transformer": net})())
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.standard_normal((2, 16, 8, 8), dtype=np.float32))
    context = torch.from_numpy(rng.standard_normal((2, 77 + 256, net.config.joint_attention_dim), dtype=np.float32))
    pooled = torch.from_numpy(rng.standard_normal((2, net.config.pooled_projection_dim), dtype=np.float32))
    timestep = torch.tensor([900.0, 900.0])
    with torch.no_grad():
        for skipped in ([], [0], [1]):
            keep = torch.ones(net.config.num_layers)
            keep[skipped] = 0.0
            ours = wrapper(sample, timestep, context, pooled, keep)
            stock = net(hidden_states=sample, timestep=timestep, encoder_hidden_states=context, pooled_projections=pooled,
                        skip_layers=skipped or None, return_dict=False)[0]
            torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)  # slices change GEMM blocking, not the math
    assert torch.nn.functional.scaled_dot_product_attention is stock_attention  # put back after each call


def test_skip_layer_guidance_matches_diffusers(pipeline, reference):
    """StableDiffusion3Pipeline's skip_guidance_layers: a third call on the prompt's rows with block 0 skipped, in the
    evaluations between steps x start and steps x stop."""
    from sdfast.runtime.generation import SkipLayerGuidance

    slg = SkipLayerGuidance(layers=(0,), scale=6.0, start=0.1, stop=0.9)  # a strong one: the tiny model's effect is small
    expected = _expected(reference, "euler", seed=6, skip_guidance_layers=[0], skip_layer_guidance_scale=6.0,
                         skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.9)
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=6, sampler="Euler", skip_layer_guidance=slg))
    assert psnr(result.images, expected) >= 40.0
    assert psnr(result.images, _expected(reference, "euler", seed=6)) < 35.0  # the guidance changes the image
    assert "Skip layer guidance: layers 0 scale 6 from 0.1 to 0.9" in result.parameters[0]
    with pytest.raises(RequestError, match="skip-layer guidance layers must be block indices from 0 to 2, not \\[3\\]"):
        pipeline.generate(GenerationRequest(PROMPT, steps=2, skip_layer_guidance=SkipLayerGuidance(layers=(3,))))
    image = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with pytest.raises(RequestError, match="skip-layer guidance applies to txt2img only"):
        pipeline.generate(GenerationRequest(PROMPT, steps=2, init_image=image, skip_layer_guidance=slg))


def test_generate_refuses_skip_layer_options_without_layers(sd3_engine, tmp_path):
    done = run_cli("generate", sd3_engine, PROMPT, "--slg-scale", "3", "-o", tmp_path / "x.png")
    assert done.returncode != 0 and visible_lines(done.stderr)[-1] == (
        "sdfast generate: error: --slg-scale needs --slg-layers (the transformer blocks skip-layer guidance skips, e.g. 7,8,9)")
    done = run_cli("generate", sd3_engine, PROMPT, "--steps", "3", "--slg-layers", "1", "--slg-stop", "0.9", "-o", tmp_path / "y.png")
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert "Skip layer guidance: layers 1 scale 2.8 from 0.01 to 0.9" in Image.open(tmp_path / "y.png").info["parameters"]
    assert "transformer step median" in done.stderr and "U-Net" not in done.stderr  # the timing line names SD3's denoiser


def test_a_dynamically_shifted_flow_model_runs_as_diffusers_runs_it(sdfast_cache, tmp_path):
    """use_dynamic_shifting (FLUX-style configs): the shift comes from the image's token count, (H/16) x (W/16), as
    StableDiffusion3Pipeline's calculate_shift; the engine's RequestChecker computes it from the manifest."""
    import shutil

    from sdfast.export.build import ExportRequest, export_engine
    from sdfast.export.builtin import ensure_builtin
    from tests.test_flow_samplers import DYNAMIC_SCHEDULER

    folder = tmp_path / "dynamic-sd3"
    shutil.copytree(ensure_builtin("tiny-sd3"), folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(DYNAMIC_SCHEDULER))
    engine = export_engine(ExportRequest(model=str(folder), out=tmp_path / "engine", cpu_variant=False))
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, image_encoder=None,
                                                                   feature_extractor=None)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=5.0,
                         generator=torch.Generator("cpu").manual_seed(8), output_type="np").images
    result = Pipeline.load(engine).generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=8, sampler="Euler"))
    assert psnr(result.images, (expected * 255).round().astype(np.uint8)) >= 40.0


def test_an_export_with_sliced_attention_matches_diffusers(reference, monkeypatch, tmp_path):
    """The exported graph computes attention in query slices (QUERY_SLICE; here 100 of the 349 tokens): same image."""
    from sdfast.export.build import ExportRequest, export_engine
    from sdfast.export.families import sd3

    monkeypatch.setattr(sd3, "QUERY_SLICE", 100)
    engine = export_engine(ExportRequest(model="tiny-sd3", out=tmp_path / "sliced", cpu_variant=False))
    import onnx

    softmaxes = sum(node.op_type == "Softmax" for node in onnx.load(str(engine / "transformer.onnx"), load_external_data=False).graph.node)
    assert softmaxes >= 4 * 3, softmaxes  # 4 slices in each of the 3 blocks' joint attention
    result = Pipeline.load(engine).generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=7, sampler="Euler"))
    assert psnr(result.images, _expected(reference, "euler")) >= 40.0
