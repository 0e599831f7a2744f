"""Sampler names users know (AUTOMATIC1111 and diffusers) mapped to sdfast's samplers and plans."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sdfast.errors import ConfigError, RequestError
from sdfast.sampling import samplers
from sdfast.sampling.schedules import NoiseSchedule, SamplingPlan, ddim_plan, euler_plan


@dataclass(frozen=True)
class SamplerSpec:
    key: str
    a1111_name: str
    diffusers_class: str
    default_spacing: str  # the diffusers class's own default, used when the config names none
    make_plan: Callable[[dict, NoiseSchedule, int, str], SamplingPlan]
    run: Callable[..., np.ndarray]  # run(model, x, plan, callback, *, scheduler_config, noise)
    stochastic: bool = False  # draws fresh noise from the seeded generator at each step
    # Scheduler options this sampler sets on top of the model's config, e.g. {"use_karras_sigmas": True} for "... Karras".
    config_overrides: dict[str, Any] = field(default_factory=dict)

    def config_for(self, model_config: dict) -> dict:
        """The scheduler config this sampler runs with: the model's, plus the sampler's own overrides."""
        return {**model_config, **self.config_overrides}

    def plan(self, model_config: dict, schedule: NoiseSchedule, steps: int) -> SamplingPlan:
        check_supported(model_config)
        config = self.config_for(model_config)
        spacing = config.get("timestep_spacing") or self.default_spacing
        return self.make_plan(config, schedule, steps, spacing)


# Scheduler options that would change the result, with the values sdfast implements. Anything else is refused
# rather than silently giving an image that differs from diffusers.
_SUPPORTED_OPTIONS = {
    "use_karras_sigmas": (None, False),
    "use_exponential_sigmas": (None, False),
    "use_beta_sigmas": (None, False),
    "timestep_type": (None, "discrete"),
    "final_sigmas_type": (None, "zero"),
    "interpolation_type": (None, "linear"),
    "rescale_betas_zero_snr": (None, False),
    "thresholding": (None, False),
}


def check_supported(scheduler_config: dict) -> None:
    for option, allowed in _SUPPORTED_OPTIONS.items():
        if scheduler_config.get(option) not in allowed:
            raise ConfigError(f"the model's scheduler config sets {option}={scheduler_config[option]!r}, which sdfast does not support yet")


def _run_ddim(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None, eta: float = 0.0):
    clip = scheduler_config.get("clip_sample_range", 1.0) if scheduler_config.get("clip_sample", True) else None
    return samplers.sample_ddim(
        model, x, plan.sigmas, callback, eta=eta, noise=noise, clip_denoised=clip, landing_sigmas=plan.landing_sigmas
    )


def _run_euler(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return samplers.sample_euler(model, x, plan.sigmas, callback)


SAMPLERS: dict[str, SamplerSpec] = {
    spec.key: spec
    for spec in (
        SamplerSpec("euler", "Euler", "EulerDiscreteScheduler", "linspace", euler_plan, _run_euler),
        SamplerSpec("ddim", "DDIM", "DDIMScheduler", "leading", ddim_plan, _run_ddim),
    )
}


def _aliases() -> dict[str, str]:
    table = {}
    for spec in SAMPLERS.values():
        for name in (spec.key, spec.a1111_name, spec.diffusers_class):
            table[name.lower()] = spec.key
    return table


def sampler_names() -> list[str]:
    """Every accepted name, for help and error messages."""
    return sorted({name for spec in SAMPLERS.values() for name in (spec.key, spec.a1111_name, spec.diffusers_class)}, key=str.lower)


def resolve_sampler(name: str) -> SamplerSpec:
    """A sampler by its sdfast key, A1111 name or diffusers class name, case-insensitive."""
    key = _aliases().get(str(name).strip().lower())
    if key is None:
        raise RequestError(f"unknown sampler '{name}'; valid samplers: {', '.join(sampler_names())}")
    return SAMPLERS[key]
