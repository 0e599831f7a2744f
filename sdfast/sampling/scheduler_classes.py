"""The diffusers schedulers sdfast reproduces: each one's __init__ options with their defaults, and the config one of
them gets from a model's scheduler config of another class (diffusers ConfigMixin.from_config / extract_init_dict).

The defaults differ by class (DDIM clips x0 and sets alpha to one by default, PNDM does neither; Heun, KDPM2 and DPM
SDE train on other betas), so a sampler must read an absent option as its own class's default, never the model's class's.
tests/test_samplers.py checks these tables against the installed diffusers' signatures.
"""
from __future__ import annotations

import math
from typing import Any

_TRAINING = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None,
    "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
}
_K_TRAINING = {**_TRAINING, "beta_start": 0.00085, "beta_end": 0.012}  # k-diffusion ports: SD's betas, but linear
_SIGMA_SPACINGS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_THRESHOLDING = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SOLVER = {
    **_TRAINING, **_THRESHOLDING, **_SIGMA_SPACINGS, "solver_order": 2, "lower_order_final": True, "use_flow_sigmas": False,
    "flow_shift": 1.0, "final_sigmas_type": "zero", "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}

CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "EulerDiscreteScheduler": {
        **_TRAINING, **_SIGMA_SPACINGS, "interpolation_type": "linear", "sigma_min": None, "sigma_max": None,
        "timestep_type": "discrete", "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {**_TRAINING, "rescale_betas_zero_snr": False},
    "DDIMScheduler": {
        **_TRAINING, **_THRESHOLDING, "clip_sample": True, "set_alpha_to_one": True, "clip_sample_range": 1.0,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {**_TRAINING, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "LMSDiscreteScheduler": {**_TRAINING, **_SIGMA_SPACINGS},
    "HeunDiscreteScheduler": {**_K_TRAINING, **_SIGMA_SPACINGS, "clip_sample": False, "clip_sample_range": 1.0},
    "KDPM2DiscreteScheduler": {**_K_TRAINING, **_SIGMA_SPACINGS},
    "KDPM2AncestralDiscreteScheduler": {**_K_TRAINING, **_SIGMA_SPACINGS},
    "DPMSolverMultistepScheduler": {
        **_SOLVER, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "euler_at_final": False, "use_lu_lambdas": False,
        "lambda_min_clipped": -math.inf, "variance_type": None,
    },
    "DPMSolverSDEScheduler": {**_K_TRAINING, **_SIGMA_SPACINGS, "noise_sampler_seed": None},
    "UniPCMultistepScheduler": {
        **_SOLVER, "predict_x0": True, "solver_type": "bh2", "disable_corrector": [], "solver_p": None, "sigma_min": None,
        "sigma_max": None, "shift_terminal": None,
    },
    "LCMScheduler": {
        **_TRAINING, **_THRESHOLDING, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
        "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False,
    },
}

_FLOW_SIGMA_SPACINGS = {**_SIGMA_SPACINGS, "shift_terminal": None, "invert_sigmas": False}
# Flow-matching schedulers (SD3): not VP, so apart from CLASS_DEFAULTS (registry.VP_SCHEDULER_CLASSES is built from it).
FLOW_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
        "base_image_seq_len": 256, "max_image_seq_len": 4096, **_FLOW_SIGMA_SPACINGS, "time_shift_type": "exponential",
        "stochastic_sampling": False,
    },
    "FlowMatchHeunDiscreteScheduler": {"num_train_timesteps": 1000, "shift": 1.0},
}


def config_as(class_name: str, model_config: dict, overrides: dict | None = None) -> dict:
    """The config ``class_name.from_config(model_config, **overrides)`` runs with, as diffusers builds it.

    Each of the class's options takes the model's value, else the class's own default; the model's other keys stay
    (diffusers keeps them as hidden config that some schedulers read, e.g. sigma_min for Karras sigmas); options the
    model's config lists under ``_use_default_values`` (defaults its own class filled in) count as absent.
    """
    defaults = CLASS_DEFAULTS[class_name] if class_name in CLASS_DEFAULTS else FLOW_CLASS_DEFAULTS[class_name]
    filled_in = set(model_config.get("_use_default_values") or ())
    given = {k: v for k, v in model_config.items() if k not in filled_in and k != "_use_default_values"}
    own = {k: given.get(k, default) for k, default in defaults.items()}
    return {**given, **own, "_class_name": class_name, **(overrides or {})}
