"""Each sampler's full loop against diffusers' scheduler, on the same deterministic stand-in model and noise."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdfast.errors import RequestError
from sdfast.sampling.denoiser import Denoiser
from sdfast.sampling.noise import TorchCompatibleGenerator
from sdfast.sampling.registry import resolve_sampler, sampler_names
from sdfast.sampling.schedules import NoiseSchedule

SD15_SCHEDULER = {  # stable-diffusion-v1-5's scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
SHAPE = (1, 4, 8, 8)


def stand_in_model(x: np.ndarray, t: float) -> np.ndarray:
    """A smooth, deterministic fake U-Net output that depends on both the input and the timestep."""
    return (0.6 * np.tanh(x) + 0.3 * np.cos(x * 1.7 + t / 250.0) + 0.05 * (t / 1000.0)).astype(np.float32)


def run_diffusers(cls_name: str, config: dict, steps: int, seed: int, prediction_type: str, eta: float = 0.0) -> np.ndarray:
    scheduler = getattr(diffusers, cls_name).from_config({**config, "prediction_type": prediction_type})
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    extra = {"eta": eta, "generator": generator} if cls_name == "DDIMScheduler" else {}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        output = torch.from_numpy(stand_in_model(model_input.numpy(), float(t)))
        latents = scheduler.step(output, t, latents, **extra).prev_sample
    return latents.numpy()


def run_sdfast(name: str, config: dict, steps: int, seed: int, prediction_type: str, **options) -> np.ndarray:
    spec = resolve_sampler(name)
    schedule = NoiseSchedule.from_config(config)
    plan = spec.plan(config, schedule, steps)
    generator = TorchCompatibleGenerator(seed)
    denoiser = Denoiser(stand_in_model, prediction_type, lambda sigma: plan.timestep_for(sigma, schedule))
    x = generator.randn(SHAPE) * np.float32(plan.initial_noise_scale)
    x = spec.run(denoiser, x, plan, scheduler_config=config, noise=generator.randn, **options)
    return x * np.float32(plan.final_scale)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler,cls_name", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler")])
def test_sampler_matches_diffusers(sampler, cls_name, spacing, prediction_type, steps):
    config = dict(SD15_SCHEDULER)
    if spacing:
        config["timestep_spacing"] = spacing
    reference = run_diffusers(cls_name, config, steps, seed=3, prediction_type=prediction_type)
    ours = run_sdfast(sampler, config, steps, seed=3, prediction_type=prediction_type)
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("steps", [4, 20])
def test_ddim_eta_and_clip_match_diffusers(steps):
    config = {**SD15_SCHEDULER, "clip_sample": True, "set_alpha_to_one": True}
    reference = run_diffusers("DDIMScheduler", config, steps, seed=11, prediction_type="epsilon", eta=0.7)
    ours = run_sdfast("ddim", config, steps, seed=11, prediction_type="epsilon", eta=0.7)
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("name", ["Euler", "euler", "EULERDISCRETESCHEDULER", "ddim", "DDIMScheduler"])
def test_sampler_names_resolve_case_insensitively(name):
    assert resolve_sampler(name).key in {"euler", "ddim"}


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(RequestError) as error:
        resolve_sampler("Euler z")
    for name in sampler_names():
        assert name in str(error.value)
