"""Plans for the multistep and solver samplers, as diffusers' set_timesteps makes them, and the runs that feed them to multistep.py.

DPMSolverMultistepScheduler, UniPCMultistepScheduler and LCMScheduler keep VP latents (init_noise_sigma 1): their
plans start from noise * sqrt(1 + sigma_0^2) in VE form. DPMSolverSDEScheduler keeps VE latents, as Euler does.
All four end at sigma 0, where VE and VP agree (final_scale 1).
"""
from __future__ import annotations

import math

import numpy as np

from sdfast.errors import ConfigError, RequestError
from sdfast.sampling import multistep
from sdfast.sampling.brownian import BrownianTreeNoiseSampler
from sdfast.sampling.parametrization import sigmas_to_timesteps
from sdfast.sampling.schedules import TIMESTEP_SPACINGS, NoiseSchedule, SamplingPlan, karras_sigmas


def _refuse_unless(config: dict, scheduler: str, **allowed: tuple) -> None:
    """Refuse scheduler options whose other values sdfast does not implement, rather than differ from diffusers."""
    for option, values in allowed.items():
        if config.get(option) not in values:
            raise ConfigError(f"{scheduler}: {option}={config[option]!r} is not supported by sdfast")


def _check_steps(steps: int, num_train: int) -> None:
    if not 1 <= steps <= num_train:
        raise RequestError(f"steps must be from 1 to the schedule's {num_train} training timesteps, not {steps}")


def _solver_timesteps(config: dict, num_train: int, steps: int, spacing: str, last_timestep: int) -> np.ndarray:
    """[steps] int64 descending: DPMSolverMultistep's and UniPC's spacing, which spaces steps + 1 points and drops the last."""
    _check_steps(steps, num_train)
    if spacing == "linspace":
        timesteps = np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last_timestep // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        timesteps = np.arange(last_timestep, 0, -num_train / steps).round().astype(np.int64) - 1
    else:
        raise ConfigError(f"scheduler config: timestep_spacing '{spacing}' is not one of {', '.join(TIMESTEP_SPACINGS)}")
    if len(np.unique(timesteps)) != len(timesteps):
        raise RequestError(f"{steps} steps with '{spacing}' timestep spacing repeat timesteps; use fewer steps")
    return timesteps


def _vp_start_plan(sigmas: np.ndarray, timesteps: np.ndarray) -> SamplingPlan:
    """A plan for schedulers that start from unscaled VP noise (init_noise_sigma 1) and end at sigma 0."""
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return SamplingPlan(
        sigmas=sigmas,
        timesteps=timesteps.astype(np.float32),
        initial_noise_scale=float(np.sqrt(1.0 + float(sigmas[0]) ** 2)),
        final_scale=1.0,
    )


def dpm_solver_plan(config: dict, schedule: NoiseSchedule, steps: int, spacing: str) -> SamplingPlan:
    """DPMSolverMultistepScheduler.set_timesteps: integer timesteps (above lambda_min_clipped), or Karras sigmas over the training range."""
    _refuse_unless(config, "DPMSolverMultistepScheduler", use_lu_lambdas=(None, False), use_flow_sigmas=(None, False))
    ac = schedule.alphas_cumprod  # float32, as the lambdas diffusers clips
    lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))
    clipped = int(np.searchsorted(lambdas[::-1], config.get("lambda_min_clipped", -math.inf)))
    timesteps = _solver_timesteps(config, schedule.num_train_timesteps, steps, spacing, schedule.num_train_timesteps - clipped)
    train = schedule.sigmas  # [T] float32
    if config.get("use_karras_sigmas"):
        sigmas = karras_sigmas(steps, float(train[0]), float(train[-1]))
        timesteps = sigmas_to_timesteps(sigmas, schedule.sigmas)
        if config.get("beta_schedule") != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    else:
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    return _vp_start_plan(sigmas, timesteps.astype(np.int64))  # diffusers keeps int64 timesteps


def unipc_plan(config: dict, schedule: NoiseSchedule, steps: int, spacing: str) -> SamplingPlan:
    """UniPCMultistepScheduler.set_timesteps: integer timesteps, or Karras sigmas (config's sigma_min / sigma_max, else the training range)."""
    _refuse_unless(
        config, "UniPCMultistepScheduler", predict_x0=(None, True), lower_order_final=(None, True), use_flow_sigmas=(None, False)
    )
    num_train = schedule.num_train_timesteps
    timesteps = _solver_timesteps(config, num_train, steps, spacing, num_train)
    train = schedule.sigmas  # [T] float32
    if config.get("use_karras_sigmas"):
        low = config.get("sigma_min") if config.get("sigma_min") is not None else float(train[0])
        high = config.get("sigma_max") if config.get("sigma_max") is not None else float(train[-1])
        sigmas = karras_sigmas(steps, low, high)
        timesteps = sigmas_to_timesteps(sigmas, schedule.sigmas).round()
    else:
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    return _vp_start_plan(sigmas, timesteps.astype(np.int64))


def dpm_sde_plan(config: dict, schedule: NoiseSchedule, steps: int, spacing: str) -> SamplingPlan:
    """DPMSolverSDEScheduler.set_timesteps: Euler-like sigmas (or Karras over them), plus its log-sigma midpoints and their timesteps."""
    num_train = schedule.num_train_timesteps
    _check_steps(steps, num_train)
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train - 1, steps, dtype=float)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(0, steps) * (num_train // steps)).round()[::-1].astype(float) + config.get("steps_offset", 0)
    elif spacing == "trailing":
        timesteps = np.arange(num_train, 0, -num_train / steps).round().astype(float) - 1
    else:
        raise ConfigError(f"scheduler config: timestep_spacing '{spacing}' is not one of {', '.join(TIMESTEP_SPACINGS)}")
    train = schedule.sigmas  # [T] float32
    sigmas = np.interp(timesteps, np.arange(len(train)), train)  # [steps] float64
    if config.get("use_karras_sigmas"):
        sigmas = karras_sigmas(steps, float(sigmas[-1]), float(sigmas[0]))
        timesteps = sigmas_to_timesteps(sigmas, schedule.sigmas)
    # Per step, 0 for the last (an Euler step to sigma 0): the midpoint sigma in the sampler's float32 arithmetic, and
    # the U-Net's timestep there, which diffusers interpolates from the float64 sigmas.
    midpoint_timesteps = sigmas_to_timesteps(np.exp(-(-np.log(sigmas[:-1]) + np.diff(-np.log(sigmas)) * 0.5)), schedule.sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    midpoint_sigmas = [multistep.sde_midpoint(s, s_next) for s, s_next in zip(sigmas[:-2], sigmas[1:-1])] + [0.0]
    sigma_max = float(sigmas.max())
    return SamplingPlan(
        sigmas=sigmas,
        timesteps=timesteps.astype(np.float32),
        initial_noise_scale=sigma_max if spacing in ("linspace", "trailing") else float(np.float32((sigma_max**2 + 1) ** 0.5)),
        final_scale=1.0,
        midpoint_sigmas=np.asarray(midpoint_sigmas, dtype=np.float32),  # [steps]
        midpoint_timesteps=np.append(midpoint_timesteps, 0.0).astype(np.float32),  # [steps]
    )


def lcm_plan(config: dict, schedule: NoiseSchedule, steps: int, spacing: str) -> SamplingPlan:
    """LCMScheduler.set_timesteps: ``steps`` of the distillation's original_inference_steps timesteps; it ignores timestep_spacing."""
    num_train = schedule.num_train_timesteps
    original = int(config.get("original_inference_steps", 50))
    if not 1 <= original <= num_train:
        raise ConfigError(f"LCMScheduler: original_inference_steps={original} must be from 1 to {num_train}")
    if not 1 <= steps <= original:
        raise RequestError(f"LCM takes from 1 to the model's {original} original inference steps, not {steps}")
    origin = (np.arange(1, original + 1) * (num_train // original) - 1)[::-1]  # [original] descending
    timesteps = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    return _vp_start_plan(schedule.sigmas[timesteps].astype(np.float64), timesteps)


# -- runs: run(model, x, plan, callback, *, scheduler_config, noise) as registry.SamplerSpec calls them -------------------


def _needs_noise(noise):
    if noise is None:
        raise ValueError("this sampler draws fresh noise at every step and needs a noise source")
    return noise


def dpm_solver_options(scheduler_config: dict) -> dict:
    """sample_dpmpp_2m's options: diffusers' DPMSolverMultistep takes UniPC's bh1/bh2 (and logrho) as midpoint."""
    return {"solver_type": "heun" if scheduler_config.get("solver_type") == "heun" else "midpoint"}


def unipc_options(scheduler_config: dict) -> dict:
    """sample_unipc's options: diffusers' UniPC takes midpoint/heun/logrho as bh2."""
    return {"order": int(scheduler_config.get("solver_order", 2)), "variant": "bh1" if scheduler_config.get("solver_type") == "bh1" else "bh2",
            "disable_corrector": tuple(scheduler_config.get("disable_corrector") or ())}


def run_dpmpp_2m(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return multistep.sample_dpmpp_2m(model, x, plan.sigmas, callback, **dpm_solver_options(scheduler_config))


def run_dpmpp_2m_sde(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    solver_type = "heun" if scheduler_config.get("solver_type") == "heun" else "midpoint"
    return multistep.sample_dpmpp_2m_sde(model, x, plan.sigmas, callback, noise=_needs_noise(noise), solver_type=solver_type)


def run_dpmpp_sde(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None, seeds=None):
    """DPM++ SDE with diffusers' Brownian-tree noise.

    The tree's seed is the config's ``noise_sampler_seed`` (diffusers' own: one tree over the batch), else ``seeds``
    (one tree per image; the same noise as diffusers with noise_sampler_seed = that image's seed). With neither
    (diffusers would then draw a random seed), each image's tree is seeded from one draw of its noise stream: still
    reproducible from the generation seed, but no seed of diffusers' gives that image.
    """
    seed = scheduler_config.get("noise_sampler_seed")
    if seed is None and seeds is not None:
        seed = [int(s) for s in seeds]
    if seed is None:  # one draw from each image's stream; its 32 bits are that image's tree entropy
        seed = [int(v) for v in _needs_noise(noise)((x.shape[0],)).astype(np.float32).view(np.uint32)]
    positive = plan.sigmas[plan.sigmas > 0]
    noise_sampler = BrownianTreeNoiseSampler(x.shape, float(positive.min()), float(positive.max()), seed)
    return multistep.sample_dpmpp_sde(model, x, plan.sigmas, callback, noise_sampler=noise_sampler)


def run_unipc(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return multistep.sample_unipc(model, x, plan.sigmas, callback, **unipc_options(scheduler_config))


def run_lcm(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    # Boundary-condition scalings c_skip, c_out of the scaled timestep (sigma_data 0.5), in float32 as diffusers.
    scaled = plan.timesteps.astype(np.float32) * np.float32(scheduler_config.get("timestep_scaling", 10.0))
    c_skip = np.float32(0.25) / (scaled**2 + np.float32(0.25))
    c_out = scaled / np.sqrt(scaled**2 + np.float32(0.25))
    clip = scheduler_config["clip_sample_range"] if scheduler_config["clip_sample"] else None
    return multistep.sample_lcm(model, x, plan.sigmas, callback, noise=_needs_noise(noise), c_skip=c_skip, c_out=c_out, clip_denoised=clip)
