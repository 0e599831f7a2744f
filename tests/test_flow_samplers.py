"""Flow-matching samplers (SD3) against diffusers' schedulers, on the same stand-in model and seeded noise.

diffusers' reference is StableDiffusion3Pipeline's loop: latents = randn (no scaling), the transformer sees the
latents and the scheduler's timestep as they are, and scheduler.step takes its v prediction. DPM++ 2M and UniPC are
written out as SD3 users configure them (use_flow_sigmas, prediction_type flow_prediction, flow_shift = shift), not read
from sdfast's own spec. Tolerance: relative error < 1e-5 at 1, 4, 20 and 50 steps.
"""
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdfast.errors import ConfigError, RequestError
from sdfast.sampling.denoiser import Denoiser
from sdfast.sampling.noise import TorchCompatibleGenerator
from sdfast.sampling.registry import FLOW_SAMPLERS, check_supported, resolve_sampler, schedule_for
from sdfast.sampling.tables import run_table, sampler_table
from tests.sampler_harness import SHAPE, relative_error, stand_in_model

TOLERANCE = 1e-5
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}  # SD3.5 Medium's and Large's
DYNAMIC_SCHEDULER = {  # a dynamically shifted flow schedule (FLUX's scheduler_config.json)
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
}
ON_FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
REFERENCES = {  # sdfast key -> (the diffusers class, its options on top of the model's config)
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {**ON_FLOW_SIGMAS, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", ON_FLOW_SIGMAS),
}
IMAGE_SEQ_LEN = 1024  # 512x512 on SD3: 64x64 latents in 2x2 patches


def _mu(config: dict) -> float | None:
    """StableDiffusion3Pipeline's mu (diffusers' calculate_shift) where the scheduler shifts dynamically."""
    if not config.get("use_dynamic_shifting"):
        return None
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    return calculate_shift(IMAGE_SEQ_LEN, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"], config["max_shift"])


def run_diffusers_flow(sampler: str, config: dict, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(final latents, timesteps) of StableDiffusion3Pipeline's denoising loop with the reference scheduler."""
    cls_name, options = REFERENCES[sampler]
    options = {**options, "flow_shift": config["shift"]} if "use_flow_sigmas" in options else options
    scheduler = getattr(diffusers, cls_name).from_config({**config, **options})
    mu = _mu(config)
    scheduler.set_timesteps(steps, **({"mu": mu} if mu is not None else {}))
    latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed))
    for t in scheduler.timesteps:
        output = torch.from_numpy(stand_in_model(latents.numpy(), float(t)))
        latents = scheduler.step(output, t, latents).prev_sample
    return latents.numpy(), scheduler.timesteps.numpy()


def run_sdfast_flow(sampler: str, config: dict, steps: int, seed: int) -> tuple[np.ndarray, object]:
    """(final latents, plan) of sdfast's loop as Pipeline.generate runs it, on a flow model."""
    spec = resolve_sampler(sampler, flow_model=True)
    schedule = schedule_for(config, IMAGE_SEQ_LEN)
    plan = spec.plan(config, schedule, steps)
    denoiser = Denoiser(stand_in_model, "flow_prediction", lambda sigma: plan.timestep_for(sigma, schedule))
    x = TorchCompatibleGenerator(seed).randn(SHAPE) * np.float32(plan.initial_noise_scale)
    x = spec.run(denoiser, x, plan, scheduler_config=spec.config_for(config), noise=None)
    return x * np.float32(plan.final_scale), plan


# FlowMatchHeun has no dynamic shifting: sdfast refuses it there (test_heun_refuses_a_dynamically_shifted_model)
CASES = [(sampler, config) for config in (SD35_SCHEDULER, DYNAMIC_SCHEDULER) for sampler in REFERENCES
         if not (sampler == "heun" and config.get("use_dynamic_shifting"))]


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("sampler, config", CASES, ids=[f"{s}-{'dynamic' if c.get('use_dynamic_shifting') else 'shift3'}" for s, c in CASES])
def test_flow_sampler_matches_diffusers(sampler, steps, config):
    reference, timesteps = run_diffusers_flow(sampler, config, steps, seed=5)
    ours, plan = run_sdfast_flow(sampler, config, steps, seed=5)
    # the transformer's timestep inputs, exactly: Heun's second evaluations repeat the next step's timestep
    fed = np.concatenate([plan.timesteps[:1], np.repeat(plan.timesteps[1:], 2)]) if sampler == "heun" else plan.timesteps
    np.testing.assert_array_equal(fed, timesteps.astype(np.float32))
    assert relative_error(ours, reference) < TOLERANCE


def test_heun_refuses_a_dynamically_shifted_model():
    with pytest.raises(RequestError, match="Heun on a flow model .* has no dynamic shifting"):
        run_sdfast_flow("heun", DYNAMIC_SCHEDULER, 4, seed=0)


def test_samplers_that_do_not_apply_to_flow_models_are_refused_by_name():
    assert resolve_sampler("Euler", flow_model=True) is FLOW_SAMPLERS["euler"]
    assert resolve_sampler("FlowMatchHeunDiscreteScheduler", flow_model=True) is FLOW_SAMPLERS["heun"]
    for name in ("Euler a", "DPM++ 2M Karras", "DDIM", "LCM"):
        with pytest.raises(RequestError, match=f"sampler '{re.escape(name)}' does not apply to a flow-matching model \\(SD3\\); samplers here: Euler, Heun, DPM\\+\\+ 2M, UniPC"):
            resolve_sampler(name, flow_model=True)
    with pytest.raises(RequestError, match="'FlowMatchEulerDiscreteScheduler' does not apply to a VP \\(DDPM\\) model"):
        resolve_sampler("FlowMatchEulerDiscreteScheduler")
    with pytest.raises(RequestError, match="unknown sampler 'Eulr'; did you mean 'Euler'"):
        resolve_sampler("Eulr", flow_model=True)


@pytest.mark.parametrize("option, value", [("stochastic_sampling", True), ("invert_sigmas", True), ("shift_terminal", 0.1),
                                           ("use_karras_sigmas", True), ("time_shift_type", "linear")])
def test_flow_scheduler_options_sdfast_does_not_reproduce_are_refused_by_name(option, value):
    with pytest.raises(ConfigError, match=f"sets {option}={value!r}, which sdfast does not support yet"):
        check_supported({**SD35_SCHEDULER, option: value})


def test_dynamic_shifting_needs_the_image_size():
    with pytest.raises(ConfigError, match="dynamic shifting, which needs the image's token count"):
        schedule_for(DYNAMIC_SCHEDULER)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "unipc", "heun"])
def test_flow_samplers_have_coefficient_tables_for_the_device_loop(sampler):
    """Samplers as data cover flow Euler (and the solvers): the table's loop gives the numpy sampler's latents."""
    spec = FLOW_SAMPLERS[sampler]
    schedule = schedule_for(SD35_SCHEDULER)
    plan = spec.plan(SD35_SCHEDULER, schedule, 8)
    table = sampler_table(spec, plan, SD35_SCHEDULER, "flow_prediction", schedule)
    assert table is not None
    np.testing.assert_array_equal(table.c_in, 1.0)
    np.testing.assert_allclose(table.c_out, -table.sigmas)
    x = TorchCompatibleGenerator(1).randn(SHAPE)
    expected, _ = run_sdfast_flow(sampler, SD35_SCHEDULER, 8, seed=1)

    def denoise(state, j):  # the table's D_j from the network's output at its timestep
        return state * table.c_skip[j] + stand_in_model(state * table.c_in[j], float(table.timesteps[j])) * table.c_out[j]

    got = run_table(table, x, denoise, None)
    assert relative_error(got, expected) < TOLERANCE
