"""SD 2.x: an SD 2-shaped random model (OpenCLIP-style text encoder, linear projections, upcast attention,
v-prediction, "!" padding) exported and run by sdfast equals diffusers' StableDiffusionPipeline, sampler by sampler."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdfast.runtime.images import psnr
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from sdfast.sampling.registry import SAMPLERS
from tests.conftest import diffusers_reference
from tests.sampler_harness import diffusers_scheduler_for

PROMPT, NEGATIVE = "a lighthouse on a cliff at dawn", "blurry"


@pytest.fixture(scope="module")
def sd2_model(sdfast_cache):
    from sdfast.export.builtin import ensure_builtin

    return ensure_builtin("tiny-sd2")


@pytest.fixture(scope="module")
def sd2_engine(sd2_model, tiny_sd2_engine):
    return tiny_sd2_engine


@pytest.fixture(scope="module")
def reference(sd2_model):
    return diffusers_reference(sd2_model)


@pytest.fixture(scope="module")
def pipeline(sd2_engine):
    return Pipeline.load(sd2_engine)


def test_the_manifest_records_what_makes_it_sd2(sd2_engine, reference):
    manifest = read_manifest(sd2_engine)
    assert manifest.family == "sd15" and manifest.prediction_type == "v_prediction"
    tokenizer = manifest.tokenizers["text_encoder"]
    assert tokenizer["pad_id"] == reference.tokenizer.pad_token_id == 0 != tokenizer["eos_id"]  # "!" pads, as OpenCLIP
    assert reference.unet.config.upcast_attention and reference.unet.config.use_linear_projection


@pytest.mark.parametrize("key", [spec.key for spec in SAMPLERS.values() if spec.scheduler_class])
def test_every_sampler_matches_diffusers_on_sd2(pipeline, reference, key):
    spec = SAMPLERS[key]
    reference.scheduler = diffusers_scheduler_for(spec, pipeline.scheduler_config, seed=7)  # the model's own config
    expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=64, width=64,
                         generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
    expected = (expected * 255).round().astype(np.uint8)
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=7.5, seed=7, sampler=spec.a1111_name))
    assert result.images.std() > 10, "a flat image would make the comparison meaningless"
    assert psnr(result.images, expected) >= 40.0, key


def test_an_empty_negative_prompt_pads_as_diffusers(pipeline, reference):
    """The unconditional row of "" is BOS, EOS, then "!" (id 0) to 77, as SD 2's tokenizer pads."""
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    expected = reference(PROMPT, num_inference_steps=8, guidance_scale=5.0, height=64, width=64,
                         generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    result = pipeline.generate(GenerationRequest(PROMPT, "", steps=8, cfg_scale=5.0, seed=3, sampler="Euler"))
    assert psnr(result.images, (expected * 255).round().astype(np.uint8)) >= 40.0


def test_fp16_export_keeps_sd21_attention_scores_fp32(sd2_engine, tmp_path):
    """upcast_attention in the U-Net config: the fp16 graphs keep every attention's score path fp32 (the manifest says
    how many nodes and why), and the fp16 image stays close to the fp32 one."""
    import onnx

    from sdfast.export.build import ExportRequest, export_engine

    engine = export_engine(ExportRequest(model="tiny-sd2", out=tmp_path / "fp16", precision="fp16"))
    record = read_manifest(engine).data["components"]["unet"]["fp16"]
    graph = onnx.load(str(engine / "unet.onnx"), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    assert softmaxes and record["fp32_attention_scores"]["nodes"] == 4 * len(softmaxes)  # Softmax, Q·Kᵀ, the Q and K scalings
    for softmax in softmaxes:  # Q·Kᵀ (kept fp32, its inputs cast up) feeds the Softmax straight: no fp16 round trip
        scores = producer[softmax.input[0]]
        assert scores.op_type == "MatMul"
        assert all(producer[i].op_type in ("Cast", "Mul") for i in scores.input if i in producer)
    request = GenerationRequest(PROMPT, NEGATIVE, steps=8, seed=1, sampler="Euler a")
    fp16 = Pipeline.load(engine).generate(request)
    fp32 = Pipeline.load(sd2_engine).generate(request)
    assert psnr(fp16.images, fp32.images) >= 30.0
