"""DPM++ 2M (SDE), DPM++ SDE, UniPC and LCM against diffusers' schedulers, on the same stand-in model and seeds.

Every comparison runs diffusers' own loop (tests/sampler_harness.py) with the scheduler options the A1111 name
means (sampler_harness.reference_config, not the spec's own config_for) and asserts relative_error < 1e-5.

DPM++ SDE draws its noise from a Brownian tree (torchsde.BrownianInterval) seeded by ``noise_sampler_seed``;
sdfast.sampling.brownian ports it. The tree rounds each query time to its 1e-6 grid, so a time one float32 ulp
away can change that step's noise by about sqrt(1e-6) (relative_error up to 5e-4 here). diffusers computes those
times with torch's float32 ``** 0.5`` (its sigma table), ``log`` and ``exp``, which on x86 are MKL VML's: within
an ulp but not correctly rounded, and which results are off depends on the CPU (on an AMD EPYC: 19% of the sigma
table, 17-19% of the tree times of a 50-step run; on the Intel Xeon the tests were first written on: 28 of 2320
distinct times over these cases). So stock diffusers' image for a seed differs between CPUs. sdfast rounds
correctly, so its reference is diffusers on correctly rounded torch math (sampler_harness.correctly_rounded_torch_math:
the float64 result rounded once, torch's own result checked to be within an ulp of it); sdfast must ask the tree at
exactly the same times and give the same image, on any CPU. One more test takes stock diffusers, and sdfast asked
at diffusers' own times.

LCM is the closest to the tolerance: on the stand-in model its trajectory amplifies float32 rounding about 30-fold
(measured worst over seeds 0-15 at 50 steps: 8.6e-6; 2.9e-6 for the seed used here).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("torchsde")

from diffusers.schedulers import scheduling_dpmsolver_sde

from sdfast.errors import RequestError
from sdfast.sampling import brownian
from sdfast.sampling.denoiser import Denoiser
from sdfast.sampling.noise import TorchCompatibleGenerator
from sdfast.sampling.registry import resolve_sampler
from sdfast.sampling.schedules import NoiseSchedule
from tests.sampler_harness import (
    SD15_SCHEDULER, SHAPE, correctly_rounded_torch_math, reference_config, relative_error, run_diffusers, run_sdfast, stand_in_model,
)

# torchsde warns when diffusers asks its tree just outside [t0, t1] (by float32 rounding), then clamps, as sdfast does
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
TOLERANCE = 1e-5
SPACINGS = [None, "leading", "linspace", "trailing"]
MULTISTEP = {  # sdfast key -> the diffusers class that reference_config(key, config) configures
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",  # LCMScheduler ignores timestep_spacing; the spacings show that sdfast does too
}


def compare(sampler: str, cls_name: str, steps: int, prediction_type: str, spacing=None, seed: int = 3, **config_options) -> float:
    config = {**SD15_SCHEDULER, **config_options}
    if spacing:
        config["timestep_spacing"] = spacing
    reference = run_diffusers(cls_name, reference_config(sampler, config), steps, seed, prediction_type, reuse_scheduler=True)
    ours = run_sdfast(sampler, config, steps, seed, prediction_type)
    return relative_error(ours, reference)


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", list(MULTISTEP))
def test_multistep_sampler_matches_diffusers(sampler, spacing, prediction_type, steps):
    assert compare(sampler, MULTISTEP[sampler], steps, prediction_type, spacing) < TOLERANCE


@pytest.mark.parametrize(
    "sampler,options",
    [
        ("dpmpp_2m", {"solver_type": "heun"}),
        ("dpmpp_2m_sde", {"solver_type": "heun"}),
        ("dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}),
        ("dpmpp_2m_karras", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("dpmpp_2m", {"solver_order": 3, "algorithm_type": "dpmsolver"}),  # the spec pins DPM-Solver++ of order 2
        ("unipc", {"solver_order": 3}),
        ("unipc", {"solver_order": 3, "disable_corrector": [0, 2]}),
        ("lcm", {"original_inference_steps": 25, "timestep_scaling": 5.0}),
        ("lcm", {"clip_sample": True, "clip_sample_range": 0.8}),
    ],
)
@pytest.mark.parametrize("steps", [4, 20])
def test_scheduler_options_match_diffusers(sampler, options, steps):
    for prediction_type in ("epsilon", "v_prediction"):
        assert compare(sampler, MULTISTEP[sampler], steps, prediction_type, **options) < TOLERANCE


@pytest.mark.parametrize("options", [{"solver_type": "bh1"}, {"solver_type": "bh1", "solver_order": 3, "disable_corrector": [1]}])
@pytest.mark.parametrize("steps", [4, 20])
def test_unipc_bh1_matches_diffusers_until_its_nan_last_step(options, steps):
    """diffusers' bh1 multiplies B(h) = -inf by a zero correction on the step to sigma 0 and returns NaN everywhere.

    sdfast returns the last data prediction there (as bh2 does), and matches diffusers on every step before it.
    """
    config = {**SD15_SCHEDULER, **options}
    plan = resolve_sampler("unipc").plan(config, NoiseSchedule.from_config(config), steps)
    for prediction_type in ("epsilon", "v_prediction"):
        assert np.isnan(run_diffusers("UniPCMultistepScheduler", config, steps, 3, prediction_type)).all()
        seen = {}
        final = run_sdfast("unipc", config, steps, 3, prediction_type, callback=lambda i, x: seen.setdefault(i, x))
        assert np.isfinite(final).all()
        reference = run_diffusers("UniPCMultistepScheduler", config, steps, 3, prediction_type, stop_after=steps - 1)
        ours = seen[steps - 2] / np.float32((1 + float(plan.sigmas[steps - 1]) ** 2) ** 0.5)  # VE -> VP
        assert relative_error(ours, reference) < TOLERANCE


def record_tree_queries(monkeypatch, sampler_class, times: list | None = None) -> list[tuple[np.float32, np.float32]]:
    """Record the (sigma, sigma_next) at which ``sampler_class``'s noise sampler is asked, as float32.

    With ``times`` (another run's record), the i-th query is asked at ``times[i]`` instead.
    """
    asked: list[tuple[np.float32, np.float32]] = []
    stock_call = sampler_class.__call__

    def record(self, sigma, sigma_next):
        asked.append((np.float32(float(sigma)), np.float32(float(sigma_next))))
        if times is not None:
            sigma, sigma_next = times[len(asked) - 1]
        return stock_call(self, sigma, sigma_next)

    monkeypatch.setattr(sampler_class, "__call__", record)
    return asked


def dpmpp_sde_config(spacing=None, seed: int = 3) -> dict:
    config = {**SD15_SCHEDULER, "noise_sampler_seed": seed}
    return {**config, "timestep_spacing": spacing} if spacing else config


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_sde_karras"])
def test_dpmpp_sde_matches_diffusers_for_the_same_noise_sampler_seed(monkeypatch, sampler, steps, prediction_type, spacing):
    """diffusers on correctly rounded torch math asks the Brownian tree at sdfast's times, bit for bit, and gives its image."""
    config = dpmpp_sde_config(spacing)
    ours_asked = record_tree_queries(monkeypatch, brownian.BrownianTreeNoiseSampler)
    ours = run_sdfast(sampler, config, steps, 3, prediction_type)
    reference_asked = record_tree_queries(monkeypatch, scheduling_dpmsolver_sde.BrownianTreeNoiseSampler)
    with correctly_rounded_torch_math():
        reference = run_diffusers("DPMSolverSDEScheduler", reference_config(sampler, config), steps, 3, prediction_type, reuse_scheduler=True)
    assert len(ours_asked) == 2 * (steps - 1)  # two queries per step, none on the last (an Euler step to sigma 0)
    assert np.array_equal(np.asarray(ours_asked), np.asarray(reference_asked))
    assert relative_error(ours, reference) < TOLERANCE


def test_dpmpp_sde_matches_stock_diffusers_asked_at_its_own_times(monkeypatch):
    """Stock diffusers, on whatever this CPU's torch rounds: its tree times are sdfast's up to that rounding, and sdfast's
    loop asked at diffusers' times (the same Brownian noise) gives diffusers' own image."""
    config = dpmpp_sde_config()
    theirs = record_tree_queries(monkeypatch, scheduling_dpmsolver_sde.BrownianTreeNoiseSampler)
    reference = run_diffusers("DPMSolverSDEScheduler", config, 20, 3, "epsilon")
    ours_asked = record_tree_queries(monkeypatch, brownian.BrownianTreeNoiseSampler, times=theirs)
    ours = run_sdfast("dpmpp_sde", config, 20, 3, "epsilon")
    assert len(ours_asked) == len(theirs) == 38
    # float32 rounding: sigma (one sqrt), t = -log(sigma), the t midpoint and exp(-t) each off by under an ulp
    np.testing.assert_allclose(np.asarray(ours_asked), np.asarray(theirs), rtol=2.0**-20, atol=0)
    assert relative_error(ours, reference) < TOLERANCE


def test_correctly_rounded_torch_math_is_float64_rounded_once_and_restores_torch():
    x = np.random.default_rng(0).uniform(1e-3, 300, 4096).astype(np.float32)  # [4096]
    wide = x.astype(np.float64)
    stock = torch.Tensor.sqrt, torch.Tensor.exp, torch.Tensor.log, torch.Tensor.__pow__
    with correctly_rounded_torch_math():
        tensor = torch.from_numpy(x)
        assert np.array_equal(tensor.sqrt().numpy(), np.sqrt(wide).astype(np.float32))
        assert np.array_equal((tensor**0.5).numpy(), np.sqrt(wide).astype(np.float32))
        assert np.array_equal((tensor**2).numpy(), x * x)
        assert np.array_equal(tensor.log().numpy(), np.log(wide).astype(np.float32))
        assert np.array_equal((tensor / 100).exp().numpy(), np.exp((x / np.float32(100)).astype(np.float64)).astype(np.float32))
        assert torch.tensor(0.0).log().item() == -np.inf and torch.tensor(2.0).sqrt().shape == ()
    assert (torch.Tensor.sqrt, torch.Tensor.exp, torch.Tensor.log, torch.Tensor.__pow__) == stock


@pytest.mark.parametrize("seed,shape", [(3, (1, 4, 8, 8)), (2**31 + 5, (2, 4, 8, 8)), ([11, 12], (2, 4, 8, 8)), (7, (1, 3))])
def test_brownian_tree_matches_torchsde(seed, shape):
    """The port against diffusers' BrownianTreeNoiseSampler (torchsde's tree) at the same float32 query times."""
    sigma_min, sigma_max = np.float32(0.0291675), np.float32(14.614642)
    reference = scheduling_dpmsolver_sde.BrownianTreeNoiseSampler(torch.zeros(shape), float(sigma_min), float(sigma_max), seed)
    ours = brownian.BrownianTreeNoiseSampler(shape, sigma_min, sigma_max, seed)
    rng = np.random.default_rng(0)
    for _ in range(25):
        sigma, sigma_next = np.sort(np.exp(rng.uniform(np.log(sigma_min), np.log(sigma_max), 2)).astype(np.float32))[::-1]
        expected = reference(torch.tensor(sigma), torch.tensor(sigma_next)).numpy()
        got = ours(sigma, sigma_next)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert relative_error(got, expected) < TOLERANCE  # torch.randn's float32 rounding is all that differs


def test_reseeded_generator_is_torch_compatible_generator():
    stream = brownian._ReseededGenerator()
    for seed, shape in [(0, (1, 4, 8, 8)), (2**32 - 1, (3,)), (123456789, (1, 4, 9, 9)), (42, (17,))]:
        assert np.array_equal(stream.reseed(seed).randn(shape), TorchCompatibleGenerator(seed).randn(shape))


def run_with_noise(sampler: str, config: dict, steps: int, noise_seed: int, x: np.ndarray | None = None, **options) -> np.ndarray:
    """sdfast's loop from fixed initial noise (seed 0) with step noise from ``noise_seed``."""
    spec = resolve_sampler(sampler)
    schedule = NoiseSchedule.from_config(config)
    plan = spec.plan(config, schedule, steps)
    denoiser = Denoiser(stand_in_model, "epsilon", lambda sigma: plan.timestep_for(sigma, schedule))
    x = (TorchCompatibleGenerator(0).randn(SHAPE) if x is None else x) * np.float32(plan.initial_noise_scale)
    noise = TorchCompatibleGenerator(noise_seed).randn
    return spec.run(denoiser, x, plan, scheduler_config=spec.config_for(config), noise=noise, **options)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_sde", "dpmpp_sde_karras", "lcm"])
def test_stochastic_samplers_depend_on_the_seed(sampler):
    assert resolve_sampler(sampler).stochastic
    config = dict(SD15_SCHEDULER)
    first = run_with_noise(sampler, config, 8, noise_seed=1)
    assert np.array_equal(first, run_with_noise(sampler, config, 8, noise_seed=1))
    assert relative_error(run_with_noise(sampler, config, 8, noise_seed=2), first) > 1e-3


def test_dpmpp_sde_seeds_give_each_image_its_own_tree():
    """Per-image seeds: image i of a batch equals image i alone, and seeds=[s] equals diffusers' noise_sampler_seed=s."""
    config = dict(SD15_SCHEDULER)
    x = np.concatenate([TorchCompatibleGenerator(s).randn(SHAPE) for s in (5, 6)])  # [2, 4, 8, 8]
    batch = run_with_noise("dpmpp_sde", config, 6, noise_seed=0, x=x, seeds=[5, 6])
    for i, seed in enumerate((5, 6)):
        alone = run_with_noise("dpmpp_sde", config, 6, noise_seed=0, x=x[i : i + 1], seeds=[seed])
        assert np.array_equal(batch[i : i + 1], alone)
        via_config = run_with_noise("dpmpp_sde", {**config, "noise_sampler_seed": seed}, 6, noise_seed=0, x=x[i : i + 1])
        assert relative_error(alone, via_config) < 1e-6  # one tree of shape [1, ...] or per-image [...]: same draws


def test_lcm_refuses_more_steps_than_its_original_schedule():
    with pytest.raises(RequestError):
        resolve_sampler("lcm").plan(dict(SD15_SCHEDULER), NoiseSchedule.from_config(SD15_SCHEDULER), 51)


@pytest.mark.parametrize("name,key", [("DPM++ 2M Karras", "dpmpp_2m_karras"), ("DPMSolverMultistepScheduler", "dpmpp_2m"),
                                      ("dpm++ sde", "dpmpp_sde"), ("UniPCMultistepScheduler", "unipc"), ("LCM", "lcm")])
def test_names_resolve(name, key):
    assert resolve_sampler(name).key == key
