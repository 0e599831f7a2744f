"""Flow matching as SD3 samples it: x_t = (1 - t) x0 + t noise and a network that predicts v = noise - x0.

Rectified flow (Liu et al. 2023) trained by conditional flow matching (Lipman et al. 2023), with SD3's shifted
timesteps (Esser et al. 2024, 'Scaling Rectified Flow Transformers', section 5.3.2). Flow latents keep their own form:
a plan's sigma is t in [0, 1], the sampler state is x_t itself, and D(x; t) = x - t v (parametrization.py). There,
k-diffusion's Euler and Heun are diffusers' FlowMatchEuler and FlowMatchHeun unchanged, since (x - D) / t = v.
DPM-Solver++ and UniPC are written in VE form; ``in_ve_form`` runs them on sigma_ve = t / (1 - t) and
x_ve = x_t / (1 - t), the same x0 (their flow plans stop short of t = 1, where that form is infinite).

Plans follow diffusers' set_timesteps for FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler and the
use_flow_sigmas branches of DPMSolverMultistepScheduler and UniPCMultistepScheduler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdfast.errors import ConfigError, RequestError
from sdfast.sampling import multistep, samplers, solver_plans
from sdfast.sampling.schedules import SamplingPlan

f32 = np.float32
FLOW_SCHEDULER_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# Options of the flow schedulers whose other values sdfast does not implement (refused by name, never ignored).
_UNSUPPORTED = {
    "invert_sigmas": (None, False), "shift_terminal": (None, 0, 0.0), "stochastic_sampling": (None, False),
    "use_karras_sigmas": (None, False), "use_exponential_sigmas": (None, False), "use_beta_sigmas": (None, False),
    "time_shift_type": (None, "exponential"),
}


def check_flow_config(config: dict) -> None:
    """Refuse a flow scheduler config with an option sdfast does not reproduce."""
    for option, allowed in _UNSUPPORTED.items():
        if config.get(option) not in allowed:
            raise ConfigError(f"the model's scheduler config sets {option}={config[option]!r}, which sdfast does not support yet")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3's timestep shift, shift * t / (1 + (shift - 1) * t) (Esser et al. 2024, eq. 23), in the input's precision."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift_mu(image_seq_len: int, config: dict) -> float:
    """diffusers' calculate_shift: mu linear in the image's token count, from base_shift at base_image_seq_len to max_shift."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


@dataclass(frozen=True)
class FlowSchedule:
    """A flow model's training schedule: its timestep count, shift and (dynamic shifting) the shift of this image size."""

    num_train_timesteps: int
    shift: float
    mu: float | None = None  # exp(mu) replaces shift where the config uses dynamic shifting (FLUX's; SD3.5's configs do not)

    @classmethod
    def from_config(cls, config: dict, image_seq_len: int | None = None) -> "FlowSchedule":
        """The schedule of a FlowMatch scheduler config; ``image_seq_len`` (latent tokens) is needed with dynamic shifting."""
        check_flow_config(config)
        mu = None
        if config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ConfigError("the model's scheduler uses dynamic shifting, which needs the image's token count")
            mu = dynamic_shift_mu(image_seq_len, config)
        return cls(int(config.get("num_train_timesteps", 1000)), float(config.get("shift", 1.0)), mu)

    def sigma_to_timestep(self, sigma: float) -> float:
        """The transformer's timestep input at t: t times the training timestep count."""
        return float(f32(sigma) * f32(self.num_train_timesteps))

    def train_range(self, dynamic: bool) -> tuple[float, float]:
        """(sigma_max, sigma_min) of the scheduler's constructor: float32 t = 1 and 1 / T, shifted unless dynamic."""
        count = self.num_train_timesteps
        ends = np.asarray([count, 1], f32) / f32(count)  # [2] float32, as torch's float32 division
        if not dynamic:
            ends = f32(self.shift) * ends / (f32(1) + f32(self.shift - 1) * ends)
        return float(ends[0]), float(ends[1])


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise RequestError(f"steps must be an integer >= 1, not {steps}")


def _flow_plan(sigmas: np.ndarray, timesteps: np.ndarray) -> SamplingPlan:
    """A plan on flow times ending at t = 0; the state is x_t, so the noise goes in unscaled and x_0 comes out as is."""
    sigmas = np.concatenate([sigmas.astype(f32), [f32(0)]]).astype(f32)
    return SamplingPlan(sigmas=sigmas, timesteps=timesteps.astype(f32), initial_noise_scale=1.0, final_scale=1.0)


def flow_euler_plan(config: dict, schedule: FlowSchedule, steps: int, spacing: str = "") -> SamplingPlan:
    """FlowMatchEulerDiscreteScheduler.set_timesteps: ``steps`` times evenly between its sigma_max and sigma_min, shifted."""
    _check_steps(steps)
    dynamic = schedule.mu is not None
    sigma_max, sigma_min = schedule.train_range(dynamic)
    count = schedule.num_train_timesteps
    sigmas = np.linspace(sigma_max * count, sigma_min * count, steps) / count  # [steps] float64
    if dynamic:
        sigmas = math.exp(schedule.mu) / (math.exp(schedule.mu) + (1 / sigmas - 1))  # time_shift(mu, 1.0, t)
    else:
        sigmas = shift_sigmas(sigmas, schedule.shift)
    sigmas = sigmas.astype(f32)
    return _flow_plan(sigmas, sigmas * f32(count))


def flow_heun_plan(config: dict, schedule: FlowSchedule, steps: int, spacing: str = "") -> SamplingPlan:
    """FlowMatchHeunDiscreteScheduler.set_timesteps: Euler's times with the config's fixed shift (it has no dynamic shifting)."""
    if schedule.mu is not None:
        raise RequestError("Heun on a flow model (diffusers' FlowMatchHeunDiscreteScheduler) has no dynamic shifting, which "
                           "this model's scheduler uses; choose Euler, DPM++ 2M or UniPC")
    return flow_euler_plan(config, schedule, steps)


def _solver_shift(config: dict, schedule: FlowSchedule) -> float:
    """flow_shift, or exp(mu) with dynamic shifting (DPMSolverMultistep's set_timesteps(mu=...))."""
    return math.exp(schedule.mu) if schedule.mu is not None else float(config.get("flow_shift", 1.0))


def flow_dpm_solver_plan(config: dict, schedule: FlowSchedule, steps: int, spacing: str = "") -> SamplingPlan:
    """DPMSolverMultistepScheduler with use_flow_sigmas: 1 - linspace(1, 1/T, steps + 1), shifted, the 0 dropped; int64 timesteps."""
    _check_steps(steps)
    count = schedule.num_train_timesteps
    sigmas = 1.0 - np.linspace(1, 1 / count, steps + 1)
    shift = _solver_shift(config, schedule)
    sigmas = np.flip(shift_sigmas(sigmas, shift))[:-1].copy()  # [steps] float64, descending
    return _flow_plan(sigmas, (sigmas * count).astype(np.int64))


def flow_unipc_plan(config: dict, schedule: FlowSchedule, steps: int, spacing: str = "") -> SamplingPlan:
    """UniPCMultistepScheduler with use_flow_sigmas: linspace(1, 1/T, steps + 1) without its last, shifted, 1 moved to 1 - 1e-6."""
    _check_steps(steps)
    count = schedule.num_train_timesteps
    sigmas = np.linspace(1, 1 / count, steps + 1)[:-1]
    if schedule.mu is not None:
        sigmas = math.exp(schedule.mu) / (math.exp(schedule.mu) + (1 / sigmas - 1))
    else:
        sigmas = shift_sigmas(sigmas, float(config.get("flow_shift", 1.0)))
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    return _flow_plan(sigmas, (sigmas * count).astype(np.int64))


def in_ve_form(sampler, model, x: np.ndarray, sigmas: np.ndarray, callback=None, **options) -> np.ndarray:
    """Run a VE-form sampler on flow latents: sigma_ve = t / (1 - t), x_ve = x_t / (1 - t), the same x0 estimate.

    The model and the callback still see flow times and x_t; ``sigmas`` (flow times) must stay below 1.
    """
    times = sigmas.astype(np.float64)  # [n + 1]
    if times.max() >= 1.0:
        raise ValueError("a VE-form sampler cannot start at flow time 1 (infinite sigma_ve)")
    keep = 1.0 - times  # how much of x_ve is in x_t
    ve_sigmas = times / keep
    time_of = {float(v): float(t) for v, t in zip(ve_sigmas, sigmas)}

    def ve_model(x_ve: np.ndarray, sigma_ve: float) -> np.ndarray:
        t = time_of[float(sigma_ve)]
        return model(x_ve * f32(1.0 - t), t)  # D is x0 in both forms

    def ve_callback(i: int, x_ve: np.ndarray):
        replaced = callback(i, x_ve * f32(keep[i + 1]))
        return None if replaced is None else replaced / f32(keep[i + 1])

    x_ve = sampler(ve_model, x / f32(keep[0]), ve_sigmas, ve_callback if callback else None, **options)
    return x_ve * f32(keep[-1])


# -- runs: run(model, x, plan, callback, *, scheduler_config, noise) as registry.SamplerSpec calls them -------------------


def run_flow_euler(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return samplers.sample_euler(model, x, plan.sigmas, callback)


def run_flow_heun(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return samplers.sample_heun(model, x, plan.sigmas, callback)


def run_flow_dpmpp_2m(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return in_ve_form(multistep.sample_dpmpp_2m, model, x, plan.sigmas, callback, **solver_plans.dpm_solver_options(scheduler_config))


def run_flow_unipc(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return in_ve_form(multistep.sample_unipc, model, x, plan.sigmas, callback, **solver_plans.unipc_options(scheduler_config))
