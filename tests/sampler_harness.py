"""Drive a diffusers scheduler and an sdfast sampler through the same loop, stand-in model and seeded noise."""
import contextlib
import copy
import functools
import inspect
import json

import numpy as np
import torch

import diffusers

from sdfast.sampling.denoiser import Denoiser
from sdfast.sampling.noise import TorchCompatibleGenerator
from sdfast.sampling.registry import resolve_sampler
from sdfast.sampling.schedules import NoiseSchedule

SD15_SCHEDULER = {  # stable-diffusion-v1-5's scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
SHAPE = (1, 4, 8, 8)

# What an A1111 sampler name means as options of its diffusers scheduler, from diffusers' scheduler overview table
# (https://huggingface.co/docs/diffusers/api/schedulers/overview; "DPM++ 2M" is DPM-Solver++ of order 2 by its name).
# Written out here, not read from the sampler spec, so a spec that drops an option (a "Karras" that is not) fails its
# parity test instead of configuring its own reference the same wrong way.
KARRAS = {"use_karras_sigmas": True}
DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
A1111_OPTIONS = {
    "euler_karras": KARRAS, "heun_karras": KARRAS, "dpm2_karras": KARRAS, "dpm2_a_karras": KARRAS, "lms_karras": KARRAS,
    "dpmpp_2s_a_karras": KARRAS, "dpmpp_sde_karras": KARRAS,
    "dpmpp_2m": DPMPP_2M, "dpmpp_2m_karras": {**DPMPP_2M, **KARRAS},
    "dpmpp_2m_sde": DPMPP_2M_SDE, "dpmpp_2m_sde_karras": {**DPMPP_2M_SDE, **KARRAS},
}


def reference_config(sampler: str, config: dict) -> dict:
    """The diffusers scheduler config that reproduces sdfast sampler ``sampler`` on a model whose config is ``config``."""
    return {**config, **A1111_OPTIONS.get(sampler, {})}


def diffusers_scheduler_for(spec, model_config: dict, seed: int):
    """The diffusers scheduler of sdfast sampler ``spec`` on a model whose scheduler config is ``model_config``; a
    Brownian-tree sampler (DPM++ SDE) gets ``noise_sampler_seed`` = ``seed``, as sdfast seeds its tree."""
    config = spec.config_for(model_config)
    if spec.seeded_tree:
        config["noise_sampler_seed"] = seed
    return getattr(diffusers, spec.scheduler_class).from_config(config)


def stand_in_model(x: np.ndarray, t: float) -> np.ndarray:
    """A smooth, deterministic fake U-Net output that depends on both the input and the timestep."""
    return (0.6 * np.tanh(x) + 0.3 * np.cos(x * 1.7 + t / 250.0) + 0.05 * (t / 1000.0)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _fresh_scheduler(cls_name: str, config_json: str):
    return getattr(diffusers, cls_name).from_config(json.loads(config_json))


def run_diffusers(
    cls_name: str, config: dict, steps: int, seed: int, prediction_type: str, *, reuse_scheduler: bool = False,
    stop_after: int | None = None, **step_options
) -> np.ndarray:
    """diffusers' own denoising loop (as StableDiffusionPipeline runs it) with ``torch.Generator('cpu').manual_seed(seed)``.

    ``reuse_scheduler`` copies a scheduler built once per class and config instead of building one per call (the same
    state: KDPM2's constructor alone runs set_timesteps over all training timesteps, a quarter second).
    ``stop_after`` ends the loop after that many scheduler steps and returns the latents there, in the scheduler's form.
    """
    full_config = {**config, "prediction_type": prediction_type}
    if reuse_scheduler:
        scheduler = copy.deepcopy(_fresh_scheduler(cls_name, json.dumps(full_config, sort_keys=True)))
    else:
        scheduler = getattr(diffusers, cls_name).from_config(full_config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    extra = dict(step_options)
    if "generator" in inspect.signature(scheduler.step).parameters:
        extra["generator"] = generator
    for i, t in enumerate(scheduler.timesteps):
        if i == stop_after:
            break
        model_input = scheduler.scale_model_input(latents, t)
        output = torch.from_numpy(stand_in_model(model_input.numpy(), float(t)))
        latents = scheduler.step(output, t, latents, **extra).prev_sample
    return latents.numpy()


def run_sdfast(name: str, config: dict, steps: int, seed: int, prediction_type: str, **options) -> np.ndarray:
    """sdfast's sampler loop as Pipeline.generate runs it, on the same stand-in model and seed."""
    spec = resolve_sampler(name)
    schedule = NoiseSchedule.from_config(config)
    plan = spec.plan(config, schedule, steps)
    generator = TorchCompatibleGenerator(seed)
    denoiser = Denoiser(stand_in_model, prediction_type, lambda sigma: plan.timestep_for(sigma, schedule))
    x = generator.randn(SHAPE) * np.float32(plan.initial_noise_scale)
    x = spec.run(denoiser, x, plan, scheduler_config=spec.config_for(config), noise=generator.randn, **options)
    return x * np.float32(plan.final_scale)


def _rounded_once(name: str, torch_op, wide_op):
    """torch_op for float32 tensors computed as wide_op in float64 and rounded once; asserts torch's own result is within an ulp."""

    def op(tensor, *args):
        own = torch_op(tensor, *args)
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            return own
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # log(0) = -inf, as torch's
            wide = np.asarray(wide_op(tensor.detach().numpy().astype(np.float64)))  # float64, < 1 ulp of float64 off
            rounded = wide.astype(np.float32)  # one rounding: the correctly rounded float32 result
            mine = own.detach().numpy().astype(np.float64)
            within_ulp = np.abs(mine - wide) < np.spacing(np.abs(rounded)).astype(np.float64)
        faithful = np.where(np.isfinite(wide), within_ulp, (mine == wide) | (np.isnan(mine) & np.isnan(wide)))
        assert faithful.all(), f"torch's float32 {name} is more than one ulp from the float64 result"
        return torch.from_numpy(np.array(rounded, dtype=np.float32, ndmin=0)).reshape(own.shape)

    return op


@contextlib.contextmanager
def correctly_rounded_torch_math():
    """Within the block, torch's float32 ``sqrt``, ``exp``, ``log`` and ``** 0.5`` on CPU tensors are correctly rounded.

    torch's CPU kernels for them are MKL VML's (vmsSqrt, vmsExp, vmsLn, through ATen's vml.h), and MKL picks its
    code path by CPU: the results are within an ulp but not always correctly rounded, and which ones are off differs
    between CPUs (AMD EPYC, AVX2 path: 19% of float32 square roots, 2% of logs, 1% of exps, whatever
    ATEN_CPU_CAPABILITY says). sdfast's numpy and Python math round correctly on every CPU. With this, a diffusers
    scheduler computes what it would on a CPU whose torch rounds correctly: the float64 result rounded once, checked
    against torch's own result (within an ulp), so it differs from stock diffusers only by torch's own rounding.
    """
    methods = {
        "sqrt": _rounded_once("sqrt", torch.Tensor.sqrt, np.sqrt),
        "exp": _rounded_once("exp", torch.Tensor.exp, np.exp),
        "log": _rounded_once("log", torch.Tensor.log, np.log),
    }
    square_root = _rounded_once("** 0.5", torch.Tensor.__pow__, np.sqrt)
    stock_pow = torch.Tensor.__pow__

    def power(tensor, exponent):
        return square_root(tensor, exponent) if isinstance(exponent, float) and exponent == 0.5 else stock_pow(tensor, exponent)

    stock = {name: getattr(torch.Tensor, name) for name in [*methods, "__pow__"]}
    try:
        for name, op in {**methods, "__pow__": power}.items():
            setattr(torch.Tensor, name, op)
        yield
    finally:
        for name, op in stock.items():
            setattr(torch.Tensor, name, op)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|: elementwise relative error is meaningless near zero."""
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
