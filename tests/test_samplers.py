"""Each sampler's full loop against diffusers' scheduler, on the same deterministic stand-in model and noise."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdfast.errors import ConfigError, RequestError
from sdfast.sampling.denoiser import Denoiser
from sdfast.sampling.noise import TorchCompatibleGenerator
from sdfast.sampling.registry import SAMPLERS, resolve_sampler, sampler_names
from sdfast.sampling.schedules import NoiseSchedule
from tests.sampler_harness import SD15_SCHEDULER, SHAPE, reference_config, relative_error, run_diffusers, run_sdfast, stand_in_model

# sdfast key -> the diffusers class that is its reference (Karras variants run it with reference_config's options)
DIFFUSERS_REFERENCES = {
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler_karras": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "heun_karras": "HeunDiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpm2_karras": "KDPM2DiscreteScheduler",
    "dpm2_a": "KDPM2AncestralDiscreteScheduler",
    "dpm2_a_karras": "KDPM2AncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "lms_karras": "LMSDiscreteScheduler",
    "plms": "PNDMScheduler",
}


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler,cls_name", DIFFUSERS_REFERENCES.items())
def test_sampler_matches_diffusers(sampler, cls_name, spacing, prediction_type, steps):
    config = dict(SD15_SCHEDULER)
    if spacing:
        config["timestep_spacing"] = spacing
    reference = run_diffusers(
        cls_name, reference_config(sampler, config), steps, seed=3, prediction_type=prediction_type, reuse_scheduler=True
    )
    ours = run_sdfast(sampler, config, steps, seed=3, prediction_type=prediction_type)
    assert relative_error(ours, reference) < 1e-5


def k_diffusion_dpmpp_2s_ancestral(config: dict, steps: int, seed: int, prediction_type: str) -> np.ndarray:
    """DPM++ 2S a's reference: diffusers has no scheduler for it (its docs list it as "N/A"); A1111 runs k-diffusion's.

    The loop below is a torch transcription of k-diffusion's sample_dpmpp_2s_ancestral (crowsonkb/k-diffusion,
    k_diffusion/sampling.py; eta = s_noise = 1), on diffusers' EulerDiscreteScheduler sigmas, timesteps and
    init_noise_sigma, with fresh noise from the seeded torch.Generator as A1111 draws it.
    """
    scheduler = diffusers.EulerDiscreteScheduler.from_config({**config, "prediction_type": prediction_type})
    scheduler.set_timesteps(steps)
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    log_sigmas = np.log(np.array(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5))

    def model(x, sigma):  # k-diffusion's CompVisDenoiser / CompVisVDenoiser around the stand-in U-Net
        index = (sigmas[:-1] == sigma).nonzero()
        t = float(timesteps[index[0]]) if len(index) else float(scheduler._sigma_to_t(np.array(sigma.item()), log_sigmas))
        output = torch.from_numpy(stand_in_model((x / (sigma**2 + 1) ** 0.5).numpy(), t))
        if prediction_type == "epsilon":
            return x - output * sigma
        return x / (sigma**2 + 1) - output * sigma / (sigma**2 + 1) ** 0.5

    def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
        sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        return sigma_down, sigma_up

    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731 (as k-diffusion writes it)
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            # Euler method
            d = (x - denoised) / sigmas[i]
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            # DPM-Solver++(2S)
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        # Noise addition
        if sigmas[i + 1] > 0:
            x = x + torch.randn(x.shape, generator=generator) * sigma_up
    return x.numpy()


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler", ["dpmpp_2s_a", "dpmpp_2s_a_karras"])
def test_dpmpp_2s_ancestral_matches_k_diffusion(sampler, spacing, prediction_type, steps):
    config = dict(SD15_SCHEDULER)
    if spacing:
        config["timestep_spacing"] = spacing
    reference = k_diffusion_dpmpp_2s_ancestral(reference_config(sampler, config), steps, 3, prediction_type)
    ours = run_sdfast(sampler, config, steps, seed=3, prediction_type=prediction_type)
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("steps", [4, 20])
def test_heun_clip_sample_matches_diffusers(steps):
    config = {**SD15_SCHEDULER, "clip_sample": True, "clip_sample_range": 0.5}
    reference = run_diffusers("HeunDiscreteScheduler", config, steps, seed=5, prediction_type="epsilon")
    ours = run_sdfast("heun", config, steps, seed=5, prediction_type="epsilon")
    assert relative_error(ours, reference) < 1e-5


EULER_CONFIG = {  # an EulerDiscreteScheduler config: no clip_sample, set_alpha_to_one or skip_prk_steps
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False, "sigma_min": 0.1, "sigma_max": 10.0,
}


def _dumped_config(cls_name: str, model_config: dict) -> dict:
    """``dict(scheduler.config)`` as a user might save it: with _use_default_values, the options its class filled in."""
    return json.loads(json.dumps(dict(getattr(diffusers, cls_name).from_config(model_config).config)))


MODEL_CONFIGS = {
    "sd15-pndm": SD15_SCHEDULER,
    "euler": EULER_CONFIG,
    "pndm-warm-up": {**SD15_SCHEDULER, "skip_prk_steps": False, "clip_sample": True},
    "ddim-dump": _dumped_config("DDIMScheduler", EULER_CONFIG),
    "heun-dump": _dumped_config("HeunDiscreteScheduler", EULER_CONFIG),  # clip_sample=False, Heun's default, filled in
    "lms-dump": _dumped_config("LMSDiscreteScheduler", SD15_SCHEDULER),
}


def test_class_defaults_are_the_diffusers_signatures():
    import inspect

    from sdfast.sampling.registry import FLOW_SAMPLERS
    from sdfast.sampling.scheduler_classes import CLASS_DEFAULTS, FLOW_CLASS_DEFAULTS

    assert {spec.scheduler_class for spec in SAMPLERS.values() if spec.scheduler_class} <= set(CLASS_DEFAULTS)
    assert {spec.scheduler_class for spec in FLOW_SAMPLERS.values()} <= set(CLASS_DEFAULTS) | set(FLOW_CLASS_DEFAULTS)
    for cls_name, defaults in {**CLASS_DEFAULTS, **FLOW_CLASS_DEFAULTS}.items():
        parameters = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        assert defaults == {name: p.default for name, p in parameters.items() if name != "self"}, cls_name


@pytest.mark.parametrize("model", MODEL_CONFIGS)
@pytest.mark.parametrize("key", [key for key, spec in SAMPLERS.items() if spec.scheduler_class])
def test_sampler_config_is_what_diffusers_from_config_gives(key, model):
    """Every option, the model's or the sampler class's default, as ``SamplerClass.from_config(model config, **overrides)``."""
    spec = SAMPLERS[key]
    scheduler = getattr(diffusers, spec.scheduler_class).from_config(MODEL_CONFIGS[model], **spec.config_overrides)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(spec.config_for(MODEL_CONFIGS[model])) == public(dict(scheduler.config))


@pytest.mark.parametrize("model", ["euler", "pndm-warm-up", "ddim-dump", "heun-dump"])
@pytest.mark.parametrize("sampler,cls_name", [("plms", "PNDMScheduler"), ("ddim", "DDIMScheduler"), ("heun_karras", "HeunDiscreteScheduler")])
def test_sampler_on_a_model_config_of_another_class_matches_diffusers(sampler, cls_name, model):
    """PLMS sets skip_prk_steps itself; absent options are the sampler class's defaults (the DDIM dump's filled-in
    set_alpha_to_one is not PNDM's, the Heun dump's filled-in clip_sample=False not DDIM's); Heun's Karras sigmas
    span the model config's sigma_min..sigma_max, as diffusers'."""
    config = MODEL_CONFIGS[model]
    overrides = SAMPLERS[sampler].config_overrides
    scheduler = getattr(diffusers, cls_name).from_config(config, **overrides)
    reference = run_diffusers(cls_name, dict(scheduler.config), 12, seed=7, prediction_type="epsilon")
    ours = run_sdfast(sampler, config, 12, seed=7, prediction_type="epsilon")
    assert relative_error(ours, reference) < 1e-5


def test_sampler_refuses_a_model_config_that_leaves_its_training_schedule_to_class_defaults():
    """Heun defaults to other betas than the model's schedule assumes when the config leaves them out: refused by name."""
    config = {key: value for key, value in EULER_CONFIG.items() if key not in ("beta_start", "beta_end")}
    assert not np.allclose(diffusers.HeunDiscreteScheduler.from_config(config).betas.numpy(), diffusers.EulerDiscreteScheduler.from_config(config).betas.numpy())
    schedule = NoiseSchedule.from_config(config)
    assert resolve_sampler("euler").plan(config, schedule, 10).steps == 10
    with pytest.raises(ConfigError, match="leaves out beta_start, beta_end.*HeunDiscreteScheduler"):
        resolve_sampler("heun").plan(config, schedule, 10)


def _run_with_step_noise(spec, noise_seed: int) -> tuple[np.ndarray, int]:
    """One run from fixed initial latents, with per-step noise from ``noise_seed``; also counts the callbacks."""
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER)
    plan = spec.plan(SD15_SCHEDULER, schedule, 6)
    denoiser = Denoiser(stand_in_model, "epsilon", lambda sigma: plan.timestep_for(sigma, schedule))
    x = TorchCompatibleGenerator(0).randn(SHAPE) * np.float32(plan.initial_noise_scale)
    calls = []
    x = spec.run(
        denoiser, x, plan, lambda i, _x: calls.append(i), scheduler_config=spec.config_for(SD15_SCHEDULER),
        noise=TorchCompatibleGenerator(noise_seed).randn,
    )
    assert calls == list(range(plan.steps))  # one callback per step, as the pipeline's progress counts them
    return x, plan.steps


@pytest.mark.parametrize("key", sorted(SAMPLERS))
def test_step_noise_matters_exactly_for_stochastic_samplers(key):
    spec = SAMPLERS[key]
    first, _ = _run_with_step_noise(spec, 1)
    second, _ = _run_with_step_noise(spec, 2)
    assert np.isfinite(first).all()
    assert (relative_error(first, second) > 1e-3) == spec.stochastic


@pytest.mark.parametrize("steps", [4, 20])
def test_ddim_eta_and_clip_match_diffusers(steps):
    config = {**SD15_SCHEDULER, "clip_sample": True, "set_alpha_to_one": True}
    reference = run_diffusers("DDIMScheduler", config, steps, seed=11, prediction_type="epsilon", eta=0.7)
    ours = run_sdfast("ddim", config, steps, seed=11, prediction_type="epsilon", eta=0.7)
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize(
    "name,key",
    [
        ("Euler", "euler"), ("euler", "euler"), ("EULERDISCRETESCHEDULER", "euler"), ("ddim", "ddim"), ("DDIMScheduler", "ddim"),
        ("Euler a", "euler_a"), ("euler A", "euler_a"), ("EulerAncestralDiscreteScheduler", "euler_a"),
        ("Euler Karras", "euler_karras"), ("Heun", "heun"), ("heun karras", "heun_karras"), ("HeunDiscreteScheduler", "heun"),
        ("DPM2", "dpm2"), ("DPM2 Karras", "dpm2_karras"), ("KDPM2DiscreteScheduler", "dpm2"), ("DPM2 a", "dpm2_a"),
        ("dpm2 a karras", "dpm2_a_karras"), ("DPM2 A KARRAS", "dpm2_a_karras"), ("KDPM2AncestralDiscreteScheduler", "dpm2_a"),
        ("LMS", "lms"), ("LMS Karras", "lms_karras"), ("lmsdiscretescheduler", "lms"), ("PLMS", "plms"),
        ("PNDMScheduler", "plms"), ("DPM++ 2S a", "dpmpp_2s_a"), ("dpm++ 2s a karras", "dpmpp_2s_a_karras"),
    ],
)
def test_sampler_names_resolve_case_insensitively(name, key):
    assert resolve_sampler(name).key == key


def test_empty_diffusers_names_are_not_sampler_names():
    assert "" not in sampler_names()
    with pytest.raises(RequestError):
        resolve_sampler("")


@pytest.mark.parametrize(
    "name,suggested", [("Euler z", "'Euler a'"), ("dpm++ 2m karas", "'DPM++ 2M Karras'"), ("DDIMScheduler2", "'DDIM'"), ("xyzzy", None)]
)
def test_unknown_sampler_lists_each_sampler_once_and_suggests_the_closest(name, suggested):
    with pytest.raises(RequestError) as error:
        resolve_sampler(name)
    message = str(error.value)
    listed = message.split("samplers: ")[1].split(" (")[0].split(", ")
    assert listed == [spec.a1111_name for spec in SAMPLERS.values()] == sampler_names()
    assert len({n.lower() for n in listed}) == len(listed) == len(SAMPLERS)  # no key, class name or case duplicate
    assert "\n" not in message and len(message) < 450
    if suggested:
        assert message.startswith(f"unknown sampler '{name}'; did you mean {suggested}")
    else:
        assert "did you mean" not in message


def test_samplers_command_lists_plms_with_its_own_setting():
    from sdfast.cli.samplers import sampler_table

    plms = next(row for row in sampler_table() if row["name"] == "PLMS")
    assert plms["diffusers"] == "PNDMScheduler" and plms["options"] == {"skip_prk_steps": True}
