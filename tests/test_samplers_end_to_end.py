"""Samplers through Pipeline.generate on models whose scheduler config is of another class than the sampler's, against
diffusers' StableDiffusionPipeline with ``SamplerClass.from_config(that config)``: absent options take the sampler
class's defaults (DDIM clips x0 and sets alpha to one unless told otherwise), and PLMS is PNDM without its warm-up."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdfast.runtime.images import psnr
from sdfast.runtime.manifest import sha256_file
from sdfast.runtime.pipeline import LOOPS, GenerationRequest, Pipeline
from tests.conftest import diffusers_reference
from tests.sampler_harness import SD15_SCHEDULER

PROMPT, NEGATIVE, SEED = "a red apple on a table", "blurry", 42
TRAINING = {key: SD15_SCHEDULER[key] for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas")}
# Configs as other classes write them: none of them names clip_sample or set_alpha_to_one unless said.
EULER = {
    "_class_name": "EulerDiscreteScheduler", **TRAINING, "interpolation_type": "linear", "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": False,
}
LMS = {"_class_name": "LMSDiscreteScheduler", **TRAINING, "prediction_type": "epsilon", "timestep_spacing": "linspace"}
PNDM = {"_class_name": "PNDMScheduler", **TRAINING, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}
# dict(scheduler.config) saved as it is: its _use_default_values says Heun filled in clip_sample=False, its own default
HEUN_DUMP = json.loads(json.dumps(dict(diffusers.HeunDiscreteScheduler.from_config(EULER).config)))


@pytest.fixture(scope="module")
def reference_pipeline(tiny_model):
    return diffusers_reference(tiny_model)


@pytest.fixture(scope="module")
def engine_with_scheduler(tiny_engine, tmp_path_factory):
    """An engine dir of the tiny model whose scheduler file is ``config`` (the manifest re-hashed, as export writes it)."""
    made = {}

    def make(config: dict):
        key = json.dumps(config, sort_keys=True)
        if key not in made:
            copy = tmp_path_factory.mktemp("scheduler-engine")
            shutil.copytree(tiny_engine, copy, dirs_exist_ok=True)
            manifest = json.loads((copy / "manifest.json").read_text())
            entry = manifest["scheduler"]
            path = copy / entry["file"]
            path.write_text(json.dumps(config, indent=2))
            entry["files"][entry["file"]] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            entry["class"] = config["_class_name"]
            (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
            made[key] = copy
        return made[key]

    return make


def diffusers_image(pipe, scheduler, steps: int, cfg: float) -> np.ndarray:
    pipe.scheduler = scheduler
    images = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=cfg, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)  # [1, 64, 64, 3]


def sdfast_images(engine_dir, sampler: str, steps: int, cfg: float) -> dict[str, np.ndarray]:
    """The image of each runtime loop: the tabulated loop, the numpy samplers and auto (the numpy samplers on the CPU)."""
    request = GenerationRequest(PROMPT, NEGATIVE, steps=steps, cfg_scale=cfg, seed=SEED, sampler=sampler)
    return {loop: Pipeline.load(engine_dir, loop=loop).generate(request).images for loop in LOOPS}


@pytest.mark.parametrize(
    "model_config",
    [EULER, {**EULER, "clip_sample": False}, {**EULER, "timestep_spacing": "linspace", "clip_sample": True, "clip_sample_range": 0.8},
     LMS, PNDM, {**PNDM, "clip_sample": False, "set_alpha_to_one": True}, HEUN_DUMP],
    ids=["euler", "euler-clip-false", "euler-clip-true-linspace", "lms", "pndm", "pndm-clip-false-alpha-one", "heun-dump"],
)
def test_ddim_on_a_model_config_of_another_class_matches_diffusers(reference_pipeline, engine_with_scheduler, model_config):
    scheduler = diffusers.DDIMScheduler.from_config(model_config)
    expected = diffusers_image(reference_pipeline, scheduler, 12, 7.0)
    assert expected.std() > 10, "a saturated or flat image would make the comparison meaningless"
    if scheduler.config.clip_sample:  # clipping x0 matters here: the other value gives another image
        unclipped = diffusers_image(reference_pipeline, diffusers.DDIMScheduler.from_config(model_config, clip_sample=False), 12, 7.0)
        assert psnr(unclipped, expected) < 30
    for loop, image in sdfast_images(engine_with_scheduler(model_config), "DDIM", 12, 7.0).items():
        assert psnr(image, expected) >= 40.0, loop


@pytest.mark.parametrize(
    "model_config", [EULER, {**PNDM, "skip_prk_steps": False}, LMS], ids=["euler", "pndm-with-warm-up", "lms"]
)
def test_plms_on_any_model_config_is_pndm_without_warm_up(reference_pipeline, engine_with_scheduler, model_config):
    scheduler = diffusers.PNDMScheduler.from_config(model_config, skip_prk_steps=True)
    expected = diffusers_image(reference_pipeline, scheduler, 12, 7.0)
    assert expected.std() > 10
    for loop, image in sdfast_images(engine_with_scheduler(model_config), "PLMS", 12, 7.0).items():
        assert psnr(image, expected) >= 40.0, loop
