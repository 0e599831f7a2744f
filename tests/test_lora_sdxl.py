"""LoRAs on SDXL: kohya's SDXL files (the original U-Net's block names, LoCon, both text encoders) and diffusers/PEFT
files, merged at run time, against StableDiffusionXLPipeline's load_lora_weights + fuse_lora."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from sdfast.runtime.images import psnr
from sdfast.runtime.lora.library import LoraLibrary
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.lora_files import as_kohya_text_encoder_2, kohya_sdxl_lora, peft_text_encoder_2_lora
from tests.test_sdxl import NEGATIVE, PROMPT, SIZE, _export, _reference, _seeded, _uint8


@pytest.fixture(scope="module")
def engine(sdfast_cache, tmp_path_factory):
    return _export("tiny-sdxl", tmp_path_factory.mktemp("sdxl-lora"))


@pytest.fixture(scope="module")
def lora_dir(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-loras")
    reference = _reference("tiny-sdxl")
    kohya_sdxl_lora(reference, folder / "sdxl_locon.safetensors", seed=21)
    peft = peft_text_encoder_2_lora(reference, folder, "peft_te2", alpha=8, seed=22)
    as_kohya_text_encoder_2(peft, folder / "kohya_te2.safetensors", alpha=8)
    return folder


@pytest.fixture(scope="module")
def pipeline(engine, lora_dir):
    pipe = Pipeline.load(engine)
    pipe.loras.library = LoraLibrary(lora_dir)
    return pipe


@pytest.fixture(scope="module")
def plain(pipeline):
    return _generate(pipeline, PROMPT)


def _generate(pipeline, prompt):
    return pipeline.generate(GenerationRequest(prompt, NEGATIVE, steps=5, cfg_scale=6.0, seed=3, sampler="euler")).images


def test_kohya_sdxl_locon_and_a_peft_second_encoder_match_diffusers(pipeline, lora_dir, plain):
    reference = _reference("tiny-sdxl", scheduler=dict(pipeline.scheduler_config, _class_name="EulerDiscreteScheduler"))
    reference.load_lora_weights(str(lora_dir), weight_name="sdxl_locon.safetensors", adapter_name="sdxl_locon")
    reference.load_lora_weights(str(lora_dir), weight_name="peft_te2.safetensors", adapter_name="peft_te2")
    reference.set_adapters(["sdxl_locon", "peft_te2"], adapter_weights=[0.7, 0.5])
    reference.fuse_lora(adapter_names=["sdxl_locon", "peft_te2"], lora_scale=1.0)
    expected = _uint8(reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=6.0, height=SIZE, width=SIZE,
                                generator=_seeded(3), output_type="np").images)
    result = _generate(pipeline, f"{PROMPT} <lora:sdxl_locon:0.7> <lora:peft_te2:0.5>")
    assert psnr(result, expected) >= 40.0 and psnr(result, plain) < 35.0
    touched = {name.split(".")[0] for f in pipeline.loras.files for name in f.updates}
    assert touched == {"unet", "text_encoder", "text_encoder_2"}


def test_kohya_second_encoder_keys_are_the_same_update_as_diffusers_format(pipeline, plain):
    kohya = _generate(pipeline, f"{PROMPT} <lora:kohya_te2:0.5>")
    peft = _generate(pipeline, f"{PROMPT} <lora:peft_te2:0.5>")
    assert psnr(kohya, peft) >= 40.0 and psnr(kohya, plain) < 35.0


def test_sgm_block_names_map_back_on_the_full_sdxl_unet():
    """kohya's original-U-Net names on SDXL's real layout (2 layers per block, 10-deep transformers), which the tiny
    model (1 layer per block) does not have: every Linear and Conv2d maps back to its diffusers path."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from sdfast.export.builtin import BUILTIN_MODELS
    from sdfast.runtime.lora.sgm_names import sgm_to_diffusers
    from tests.lora_files import sgm_name

    with init_empty_weights():
        unet = UNet2DConditionModel(**BUILTIN_MODELS["sdxl"].unet)
    attention_up = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    paths = [path for path, layer in unet.named_modules() if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))
             and path.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")]
    assert len(paths) > 700
    for path in paths:
        kohya = sgm_name(path, 2, attention_up).replace(".", "_")
        assert path.replace(".", "_") in sgm_to_diffusers(kohya, 2), (path, kohya)
