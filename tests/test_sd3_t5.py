"""SD3 with its T5 encoder: each --t5 option on a small random T5 (tiny-sd3-t5), its embedding error against PyTorch
fp32 (the manifest's parity block) and the image PSNR it causes against diffusers' StableDiffusion3Pipeline with T5."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdfast.errors import ConfigError
from sdfast.runtime.images import psnr
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import run_cli, visible_lines

PROMPT, NEGATIVE, SIZE = "a lighthouse on a cliff at dawn", "blurry", 64
# The image PSNR each option keeps against diffusers with T5 in fp32 (benchmarks/t5_options.py on tiny-sd3-t5: fp32
# 84-89 dB, fp16 75.4, int8 58.7, none 24.5); the floors leave room for another CPU's rounding, not for a broken encoder.
IMAGE_PSNR_FLOOR = {"fp32": 40.0, "fp16": 40.0, "int8": 35.0}


@pytest.fixture(scope="module")
def engines(sdfast_cache, tmp_path_factory):
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("sd3-t5-engines")
    return {t5: export_engine(ExportRequest(model="tiny-sd3-t5", out=out / t5, t5=t5, cpu_variant=False))
            for t5 in ("fp32", "fp16", "int8", "none")}


@pytest.fixture(scope="module")
def reference(sdfast_cache):
    from sdfast.export.builtin import ensure_builtin

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(ensure_builtin("tiny-sd3-t5"), image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _expected(pipe, prompt: str = PROMPT, seed: int = 3) -> np.ndarray:
    images = pipe(prompt, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=5.0,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return (images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("t5", ["fp32", "fp16", "int8"])
def test_each_t5_option_records_its_embedding_error_and_keeps_the_image(engines, reference, t5):
    manifest = read_manifest(engines[t5])
    encoder = manifest.components["text_encoder_3"]
    assert manifest.model["t5"] == t5 and encoder.precision == t5 and encoder.role == "text_encoder"
    assert manifest.tokenizers["text_encoder_3"]["kind"] == "t5" and manifest.tokenizers["text_encoder_3"]["bos_id"] is None
    parity = manifest.data["components"]["text_encoder_3"]["parity"]  # the embedding error against PyTorch fp32
    assert parity["passed"] and parity["max_rel"] <= {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-1}[t5]
    if t5 != "fp32":
        assert parity["max_rel"] > 1e-5, "a reduced-precision encoder that matches fp32 exactly was not converted"
        # T5's feed-forward outputs (wo) stay fp32 and unquantized, one per layer, as transformers keeps them
        kept = manifest.data["components"]["text_encoder_3"][t5]["fp32_matmuls"]
        assert kept["nodes"] == 2 and kept["weight_shapes"] == [[64, 96]] and "_keep_in_fp32_modules" in kept["why"]
    result = Pipeline.load(engines[t5]).generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=3, sampler="Euler"))
    assert result.images.std() > 10
    assert psnr(result.images, _expected(reference)) >= IMAGE_PSNR_FLOOR[t5]


def test_without_t5_the_image_is_another_one(engines, reference):
    """--t5 none feeds zeros, as diffusers without text_encoder_3: far from the image with T5 (the T5 test is not vacuous)."""
    result = Pipeline.load(engines["none"]).generate(GenerationRequest(PROMPT, NEGATIVE, steps=6, cfg_scale=5.0, seed=3, sampler="Euler"))
    assert psnr(result.images, _expected(reference)) < 35.0
    assert "text_encoder_3" not in read_manifest(engines["none"]).components


def test_a_prompt_past_t5s_256_tokens_is_cut_as_diffusers_cuts_it(engines, reference):
    long_prompt = " ".join(["a red lighthouse"] * 150)  # T5 pieces: far past 255; CLIP: past 75 too
    result = Pipeline.load(engines["fp32"]).generate(GenerationRequest(long_prompt, NEGATIVE, steps=6, cfg_scale=5.0, seed=5, sampler="Euler"))
    assert psnr(result.images, _expected(reference, long_prompt, seed=5)) >= 40.0
    assert any("longer than T5's 255 tokens" in warning for warning in result.warnings)


def test_t5_options_that_cannot_apply_are_refused_before_any_work(sdfast_cache, tmp_path):
    done = run_cli("export", "--model", "tiny", "--t5", "int8", "--out", tmp_path / "e")
    assert done.returncode != 0 and visible_lines(done.stderr)[-1] == "sdfast export: error: --t5 applies to the sd3 family (SD3, SD3.5) only, not to sd15"
    from sdfast.export.build import ExportRequest
    from sdfast.export.builtin import ensure_builtin
    from sdfast.export.families import sd3

    with pytest.raises(ConfigError, match="--t5 fp32: '.*' has no T5 encoder \\(text_encoder_3\\)"):
        sd3.load(ensure_builtin("tiny-sd3"), ExportRequest(model="tiny-sd3", out=tmp_path / "e", t5="fp32"))
    assert not (tmp_path / "e").exists()


def test_t5_fp16_keeps_what_overflows_fp16_in_fp32(sdfast_cache, tmp_path, monkeypatch):
    """T5-XXL's feed-forward outputs pass fp16's 65504, which is why transformers keeps wo in fp32. A tiny T5 with wo
    scaled past that limit, as an fp16 engine whose wo, residual stream, RMSNorm and softmax stay fp32, still matches
    PyTorch fp32 when every op computes in its graph's dtype (ONNX's reference evaluator: onnxruntime's CPU provider
    computes fp16 MatMuls in fp32 and drops the Casts between them, so it cannot show the overflow a GPU has); the
    same T5 with wo converted to fp16 like the other MatMuls gives NaN/inf there."""
    import shutil

    import onnx
    from onnx.reference import ReferenceEvaluator
    from safetensors.torch import load_file, save_file
    from transformers import T5EncoderModel

    from sdfast.export import component_export
    from sdfast.export.build import ExportRequest, export_engine
    from sdfast.export.builtin import ensure_builtin

    folder = tmp_path / "loud-t5"
    shutil.copytree(ensure_builtin("tiny-sd3-t5"), folder)
    weights_file = next((folder / "text_encoder_3").glob("*.safetensors"))
    weights = load_file(weights_file)
    save_file({name: value * 1e5 if name.endswith("DenseReluDense.wo.weight") else value for name, value in weights.items()}, weights_file)
    encoder = T5EncoderModel.from_pretrained(folder / "text_encoder_3").eval()
    peaks = []
    for name, layer in encoder.named_modules():
        if name.endswith("DenseReluDense.wo"):
            layer.register_forward_hook(lambda _layer, _inputs, output: peaks.append(float(output.abs().max())))
    ids = np.zeros((1, 256), np.int64)
    ids[0, :38] = np.arange(2, 40)
    with torch.no_grad():
        expected = encoder(torch.from_numpy(ids))[0].numpy()
    assert max(peaks) > 65504, "the test's T5 does not reach fp16's overflow"

    def in_graph_dtypes(engine) -> np.ndarray:
        graph = onnx.load(str(engine / "text_encoder_3.onnx"))
        return ReferenceEvaluator(graph).run(None, {"input_ids": ids})[0]

    kept = export_engine(ExportRequest(model=str(folder), out=tmp_path / "kept", t5="fp16", cpu_variant=False))
    entry = read_manifest(kept).data["components"]["text_encoder_3"]
    assert entry["parity"]["passed"] and entry["fp16"]["fp32_matmuls"]["nodes"] == 2
    assert entry["fp16"]["fp16_round_trips_removed"] > 0  # the residual stream passes between kept nodes in fp32
    got = in_graph_dtypes(kept)
    assert np.isfinite(got).all() and np.abs(got - expected).max() / np.abs(expected).max() < 2e-2

    monkeypatch.setattr(component_export, "modules_kept_fp32", lambda _module: None)  # wo converted with the other MatMuls
    whole = export_engine(ExportRequest(model=str(folder), out=tmp_path / "whole", t5="fp16", cpu_variant=False))
    assert not np.isfinite(in_graph_dtypes(whole)).all()


def test_tensorrt_refuses_an_int8_t5_by_name_before_building(engines):
    """onnxruntime's dynamic quantization (MatMulInteger) is no TensorRT graph: loading the engine dir on TensorRT says
    so before any file is hashed or any engine built, whether or not TensorRT is installed here."""
    from sdfast.errors import EngineError

    refusal = (r"^text_encoder_3 is int8 \(onnxruntime's dynamic quantization: MatMulInteger\), which TensorRT does not "
               r"parse; export it in fp16 for TensorRT \(for SD3's T5: --t5 fp16\)$")
    with pytest.raises(EngineError, match=refusal):
        Pipeline.load(engines["int8"], backend="tensorrt")
    Pipeline.load(engines["fp16"], backend="cpu")  # the same check passes a graph the backend runs
