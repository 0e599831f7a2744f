"""Sampler names users know (AUTOMATIC1111 and diffusers) mapped to sdfast's samplers and plans."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sdfast.errors import ConfigError, RequestError
from sdfast.sampling import flow, samplers
from sdfast.sampling import solver_plans
from sdfast.sampling.parametrization import check_prediction_type
from sdfast.sampling.scheduler_classes import CLASS_DEFAULTS, config_as
from sdfast.sampling.schedules import (
    NoiseSchedule,
    SamplingPlan,
    ddim_plan,
    dpm2_ancestral_plan,
    dpm2_plan,
    euler_plan,
    lms_plan,
    pndm_plan,
)


@dataclass(frozen=True)
class SamplerSpec:
    key: str
    a1111_name: str
    diffusers_class: str
    make_plan: Callable[[dict, NoiseSchedule, int, str], SamplingPlan]
    run: Callable[..., np.ndarray]  # run(model, x, plan, callback, *, scheduler_config, noise)
    stochastic: bool = False  # draws fresh noise from the seeded generator at each step
    starts_late: bool = True  # can start part-way through its schedule (img2img, inpainting)
    # The diffusers class that, with config_overrides, gives this sampler, when diffusers_class is "" (not an alias).
    equivalent_class: str = ""
    seeded_tree: bool = False
    takes_eta: bool = False  # run(..., eta=) sets the noise of DDIM's eta (Song et al. 2020, eq. 16)  # takes each image's seed for its Brownian tree (DPM++ SDE, as diffusers' noise_sampler_seed)
    # Scheduler options this sampler sets on top of the model's config, e.g. {"use_karras_sigmas": True} for "... Karras".
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluates_twice(self) -> bool:
        """Two model evaluations per step: diffusers' order-2 schedulers (Heun, DPM2, DPM++ SDE) and DPM++ 2S a."""
        return self.run in _TWO_EVALUATIONS

    @property
    def scheduler_class(self) -> str:
        """The diffusers scheduler this sampler reproduces (with config_overrides); "" for k-diffusion-only samplers."""
        return self.diffusers_class or self.equivalent_class

    @property
    def config_class(self) -> str:
        """The diffusers class whose defaults fill what the model's config leaves out (Euler's for k-diffusion-only samplers,
        which run on Euler's sigmas)."""
        return self.scheduler_class or "EulerDiscreteScheduler"

    def config_for(self, model_config: dict) -> dict:
        """The scheduler config this sampler runs with: the model's, as diffusers' config_class.from_config reads it
        (absent options take that class's defaults), plus the sampler's own overrides. A solver on flow sigmas takes the
        flow model's shift as its flow_shift, as SD3 users configure DPM++ 2M and UniPC."""
        config = config_as(self.config_class, model_config, self.config_overrides)
        if config.get("use_flow_sigmas") and "flow_shift" not in model_config and "shift" in model_config:
            config["flow_shift"] = float(model_config["shift"])
        return config

    def plan(self, model_config: dict, schedule, steps: int) -> SamplingPlan:
        """The plan for ``steps`` on ``schedule``, the model's training schedule (schedule_for(model_config))."""
        check_supported(model_config)
        config = self.config_for(model_config)
        if isinstance(schedule, NoiseSchedule) and not np.array_equal(NoiseSchedule.from_config(config).alphas_cumprod, schedule.alphas_cumprod):
            absent = [key for key in _TRAINING_OPTIONS if config.get(key) != model_config.get(key)]
            raise ConfigError(
                f"the model's scheduler config leaves out {', '.join(absent) or 'training options'}, for which "
                f"{self.config_class} (the {self.a1111_name} sampler) has defaults of another training schedule; "
                "add them to its scheduler_config.json"
            )
        return self.make_plan(config, schedule, steps, config.get("timestep_spacing", "linspace"))


def schedule_for(scheduler_config: dict, image_seq_len: int | None = None) -> "NoiseSchedule | flow.FlowSchedule":
    """The model's training schedule: a FlowSchedule for a flow-matching scheduler (``image_seq_len``, its latent tokens,
    for dynamic shifting), else the VP NoiseSchedule of its betas."""
    check_supported(scheduler_config)
    if is_flow(scheduler_config):
        return flow.FlowSchedule.from_config(scheduler_config, image_seq_len)
    return NoiseSchedule.from_config(scheduler_config)


_TRAINING_OPTIONS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


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


# diffusers scheduler classes whose config describes a VP (DDPM) training schedule that sdfast reads: the ones it
# reproduces (scheduler_classes.CLASS_DEFAULTS) and a few it does not sample with but whose betas are the same kind.
# Any other class (flow matching, EDM, consistency models) is refused by name, never read as linear betas.
VP_SCHEDULER_CLASSES = frozenset(CLASS_DEFAULTS) | {"DDPMScheduler", "DEISMultistepScheduler", "DPMSolverSinglestepScheduler", "TCDScheduler"}


def is_flow(scheduler_config: dict) -> bool:
    """The model's scheduler is a flow-matching one (SD3): its samplers are FLOW_SAMPLERS, its schedule a FlowSchedule."""
    return scheduler_config.get("_class_name") in flow.FLOW_SCHEDULER_CLASSES


def check_supported(scheduler_config: dict) -> None:
    """Refuse a scheduler config that sdfast would read as something else: an unknown class, an unsupported option."""
    class_name = scheduler_config.get("_class_name")
    if is_flow(scheduler_config):
        flow.check_flow_config(scheduler_config)
        return
    if class_name is not None and class_name not in VP_SCHEDULER_CLASSES:
        kind = ("flow matching" if "FlowMatch" in str(class_name) else "EDM" if "EDM" in str(class_name) else "not a VP (DDPM) schedule")
        known = sorted(VP_SCHEDULER_CLASSES | set(flow.FLOW_SCHEDULER_CLASSES))
        raise ConfigError(f"the model's scheduler is {class_name} ({kind}), which sdfast does not support yet; it reads "
                          f"the schedulers {', '.join(known)}")
    prediction_type = check_prediction_type(scheduler_config.get("prediction_type") or "epsilon")
    if prediction_type == "flow_prediction":
        raise ConfigError(f"the model's scheduler {class_name or '(unnamed)'} is a VP (DDPM) one, but its prediction type is "
                          "flow_prediction; a flow model names a FlowMatch scheduler")
    for option, allowed in _SUPPORTED_OPTIONS.items():
        if scheduler_config.get(option) not in allowed:
            raise ConfigError(f"the model's scheduler config sets {option}={scheduler_config[option]!r}, which sdfast does not support yet")


def _run_ddim(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None, eta: float = 0.0):
    clip = scheduler_config["clip_sample_range"] if scheduler_config["clip_sample"] else None
    return samplers.sample_ddim(
        model, x, plan.sigmas, callback, eta=eta, noise=noise, clip_denoised=clip, landing_sigmas=plan.landing_sigmas
    )


def _run_euler(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return samplers.sample_euler(model, x, plan.sigmas, callback)


def _step_noise(noise):
    if noise is None:
        raise ValueError("this sampler draws fresh noise at every step and needs a noise source")
    return noise


def _run_euler_ancestral(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return samplers.sample_euler_ancestral(model, x, plan.sigmas, callback, noise=_step_noise(noise))


def _run_heun(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    clip = scheduler_config["clip_sample_range"] if scheduler_config["clip_sample"] else None
    return samplers.sample_heun(model, x, plan.sigmas, callback, clip_denoised=clip)


def _run_dpm2(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return samplers.sample_dpm_2(model, x, plan.sigmas, callback, sigmas_mid=plan.midpoint_sigmas)


def _run_dpm2_ancestral(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return samplers.sample_dpm_2_ancestral(
        model, x, plan.sigmas, callback, noise=_step_noise(noise), sigmas_mid=plan.midpoint_sigmas
    )


def _run_lms(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return samplers.sample_lms(model, x, plan.sigmas, callback)


def _run_plms(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    # diffusers' PNDM extrapolates the network's own output, which is v for v-predicting models (the Denoiser says which).
    predicts_v = getattr(model, "prediction_type", "epsilon") == "v_prediction"
    return samplers.sample_plms(
        model, x, plan.sigmas, callback, predicts_v=predicts_v, landing_sigmas=plan.landing_sigmas, warmup_sigma=plan.warmup_sigma
    )


def _run_dpmpp_2s_ancestral(model, x, plan: SamplingPlan, callback=None, *, scheduler_config: dict, noise=None):
    return samplers.sample_dpmpp_2s_ancestral(model, x, plan.sigmas, callback, noise=_step_noise(noise))


_TWO_EVALUATIONS = (_run_heun, _run_dpm2, _run_dpm2_ancestral, _run_dpmpp_2s_ancestral, solver_plans.run_dpmpp_sde)

SAMPLERS: dict[str, SamplerSpec] = {
    spec.key: spec
    for spec in (
        SamplerSpec("euler", "Euler", "EulerDiscreteScheduler", euler_plan, _run_euler),
        SamplerSpec("ddim", "DDIM", "DDIMScheduler", ddim_plan, _run_ddim, takes_eta=True),
        # "Karras" variants are their diffusers class with use_karras_sigmas; diffusers_class is "" where no class's defaults
        # give the sampler. DPM++ 2S a has no diffusers class: it is k-diffusion's (as A1111), on Euler's sigmas.
        SamplerSpec("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", euler_plan, _run_euler_ancestral, stochastic=True),
        SamplerSpec("euler_karras", "Euler Karras", "", euler_plan, _run_euler, config_overrides={"use_karras_sigmas": True}, equivalent_class="EulerDiscreteScheduler"),
        SamplerSpec("heun", "Heun", "HeunDiscreteScheduler", euler_plan, _run_heun),
        SamplerSpec("heun_karras", "Heun Karras", "", euler_plan, _run_heun, config_overrides={"use_karras_sigmas": True}, equivalent_class="HeunDiscreteScheduler"),
        SamplerSpec("dpm2", "DPM2", "KDPM2DiscreteScheduler", dpm2_plan, _run_dpm2),
        SamplerSpec("dpm2_karras", "DPM2 Karras", "", dpm2_plan, _run_dpm2, config_overrides={"use_karras_sigmas": True}, equivalent_class="KDPM2DiscreteScheduler"),
        SamplerSpec(
            "dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", dpm2_ancestral_plan, _run_dpm2_ancestral, stochastic=True
        ),
        SamplerSpec(
            "dpm2_a_karras", "DPM2 a Karras", "", dpm2_ancestral_plan, _run_dpm2_ancestral, stochastic=True,
            config_overrides={"use_karras_sigmas": True}, equivalent_class="KDPM2AncestralDiscreteScheduler",
        ),
        SamplerSpec("lms", "LMS", "LMSDiscreteScheduler", lms_plan, _run_lms),
        SamplerSpec("lms_karras", "LMS Karras", "", lms_plan, _run_lms, config_overrides={"use_karras_sigmas": True}, equivalent_class="LMSDiscreteScheduler"),
        # PLMS is PNDM without its Runge-Kutta warm-up (A1111's PLMS), whatever the model's config says about the warm-up.
        SamplerSpec("plms", "PLMS", "PNDMScheduler", pndm_plan, _run_plms, starts_late=False, config_overrides={"skip_prk_steps": True}),
        SamplerSpec("dpmpp_2s_a", "DPM++ 2S a", "", euler_plan, _run_dpmpp_2s_ancestral, stochastic=True),
        SamplerSpec(
            "dpmpp_2s_a_karras", "DPM++ 2S a Karras", "", euler_plan, _run_dpmpp_2s_ancestral, stochastic=True,
            config_overrides={"use_karras_sigmas": True},
        ),
        # Multistep and solver samplers (solver_plans.py, multistep.py). DPM++ 2M and 2M SDE pin DPMSolverMultistep's
        # algorithm and order; DPM++ SDE takes its noise from a Brownian tree, as diffusers' DPMSolverSDEScheduler.
        SamplerSpec(
            "dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", solver_plans.dpm_solver_plan, solver_plans.run_dpmpp_2m,
            config_overrides={"algorithm_type": "dpmsolver++", "solver_order": 2},
        ),
        SamplerSpec(
            "dpmpp_2m_karras", "DPM++ 2M Karras", "", solver_plans.dpm_solver_plan, solver_plans.run_dpmpp_2m,
            config_overrides={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, equivalent_class="DPMSolverMultistepScheduler",
        ),
        SamplerSpec(
            "dpmpp_2m_sde", "DPM++ 2M SDE", "", solver_plans.dpm_solver_plan, solver_plans.run_dpmpp_2m_sde, stochastic=True,
            config_overrides={"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, equivalent_class="DPMSolverMultistepScheduler",
        ),
        SamplerSpec(
            "dpmpp_2m_sde_karras", "DPM++ 2M SDE Karras", "", solver_plans.dpm_solver_plan, solver_plans.run_dpmpp_2m_sde,
            stochastic=True, config_overrides={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, equivalent_class="DPMSolverMultistepScheduler",
        ),
        SamplerSpec(
            "dpmpp_sde", "DPM++ SDE", "DPMSolverSDEScheduler", solver_plans.dpm_sde_plan, solver_plans.run_dpmpp_sde, stochastic=True,
            starts_late=False, seeded_tree=True,
        ),
        SamplerSpec(
            "dpmpp_sde_karras", "DPM++ SDE Karras", "", solver_plans.dpm_sde_plan, solver_plans.run_dpmpp_sde, stochastic=True,
            config_overrides={"use_karras_sigmas": True}, equivalent_class="DPMSolverSDEScheduler", starts_late=False, seeded_tree=True,
        ),
        SamplerSpec("unipc", "UniPC", "UniPCMultistepScheduler", solver_plans.unipc_plan, solver_plans.run_unipc),
        SamplerSpec("lcm", "LCM", "LCMScheduler", solver_plans.lcm_plan, solver_plans.run_lcm, stochastic=True, starts_late=False),
    )
}


# Samplers of a flow-matching model (SD3), on its flow times (flow.py). The keys and A1111 names are those of their VP
# counterparts, so "Euler" means FlowMatchEuler on a flow model. DPM++ 2M and UniPC are DPMSolverMultistep and UniPC
# with use_flow_sigmas, prediction_type flow_prediction and the model's shift as flow_shift, as SD3 users set them.
_ON_FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SAMPLERS: dict[str, SamplerSpec] = {
    spec.key: spec
    for spec in (
        SamplerSpec("euler", "Euler", "FlowMatchEulerDiscreteScheduler", flow.flow_euler_plan, flow.run_flow_euler),
        SamplerSpec("heun", "Heun", "FlowMatchHeunDiscreteScheduler", flow.flow_heun_plan, flow.run_flow_heun),
        SamplerSpec(
            "dpmpp_2m", "DPM++ 2M", "", flow.flow_dpm_solver_plan, flow.run_flow_dpmpp_2m, equivalent_class="DPMSolverMultistepScheduler",
            config_overrides={**_ON_FLOW_SIGMAS, "algorithm_type": "dpmsolver++", "solver_order": 2},
        ),
        SamplerSpec("unipc", "UniPC", "", flow.flow_unipc_plan, flow.run_flow_unipc, equivalent_class="UniPCMultistepScheduler",
                    config_overrides=_ON_FLOW_SIGMAS),
    )
}
_TWO_EVALUATIONS += (flow.run_flow_heun,)


def _aliases(table_of: dict[str, SamplerSpec]) -> dict[str, str]:
    table = {}
    for spec in table_of.values():
        for name in (spec.key, spec.a1111_name, spec.diffusers_class):
            if name:  # diffusers_class is "" for samplers no diffusers class gives by default
                table[name.lower()] = spec.key
    return table


def sampler_names(flow_model: bool = False) -> list[str]:
    """Each sampler once, by its A1111 name (keys and diffusers class names are aliases), for help and error messages."""
    return [spec.a1111_name for spec in (FLOW_SAMPLERS if flow_model else SAMPLERS).values()]


def resolve_sampler(name: str, flow_model: bool = False) -> SamplerSpec:
    """A sampler by its sdfast key, A1111 name or diffusers class name, case-insensitive; ``flow_model``: among a flow
    model's samplers, where the others are refused by name."""
    wanted = str(name).strip().lower()
    table, other = (FLOW_SAMPLERS, SAMPLERS) if flow_model else (SAMPLERS, FLOW_SAMPLERS)
    aliases = _aliases(table)
    key = aliases.get(wanted)
    if key is None and wanted in _aliases(other):
        kind = "a flow-matching model (SD3)" if flow_model else "a VP (DDPM) model (it is a flow-matching sampler, for SD3)"
        raise RequestError(f"sampler '{name}' does not apply to {kind}; samplers here: {', '.join(sampler_names(flow_model))}")
    if key is None:
        close = difflib.get_close_matches(wanted, aliases, n=6, cutoff=0.6)  # the aliases nearest in spelling
        suggestions = list(dict.fromkeys(table[aliases[alias]].a1111_name for alias in close))[:3]
        hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ";"
        raise RequestError(f"unknown sampler '{name}'{hint} samplers: {', '.join(sampler_names(flow_model))} (see 'sdfast samplers')")
    return table[key]
