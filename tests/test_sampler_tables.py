"""Samplers as data: the coefficient tables the CUDA kernel consumes, checked against the numpy samplers they come from."""
import json

import numpy as np
import pytest

from sdfast.errors import StopSampling
from sdfast.runtime import pipeline as pipeline_module
from sdfast.runtime.device_loop import run_on_host
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from sdfast.sampling.denoiser import Denoiser
from sdfast.sampling.noise import TorchCompatibleGenerator
from sdfast.sampling.registry import SAMPLERS
from sdfast.sampling.schedules import NoiseSchedule
from sdfast.sampling.tables import MAX_HISTORY, run_table, sampler_table

TABULATED = [key for key, spec in SAMPLERS.items() if not spec.seeded_tree]


@pytest.fixture(scope="module")
def scheduler_config(tiny_engine):
    return json.loads((tiny_engine / "scheduler" / "scheduler_config.json").read_text())


def _mixing_model(seed: int):
    """A nonlinear stand-in for D(x; sigma) that mixes channels, unlike the one tabulate checks itself with."""
    mix = np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32) * 0.5

    def model(x, sigma):
        mixed = np.einsum("ij,bjhw->bihw", mix, x).astype(np.float32)
        return (np.sin(mixed / np.float32(1.0 + sigma)) * np.float32(2.0)).astype(np.float32)

    return model


def _mixing_unet(seed: int):
    """A nonlinear stand-in U-Net(x_in, timestep) -> model output, as sensitive to the timestep as to the input."""
    mix = np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32) * 0.5

    def unet(x_in, timestep):
        mixed = np.einsum("ij,bjhw->bihw", mix, x_in).astype(np.float32)
        return np.sin(mixed + np.float32(timestep / 100.0)).astype(np.float32)  # x_in: [B, 4, h, w] -> [B, 4, h, w]

    return unet


@pytest.mark.parametrize("key", TABULATED)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_table_reproduces_the_sampler(key, prediction_type, scheduler_config):
    spec = SAMPLERS[key]
    config = {**scheduler_config, "prediction_type": prediction_type}
    schedule = NoiseSchedule.from_config(config)
    plan = spec.plan(config, schedule, 12)
    table = sampler_table(spec, plan, config, prediction_type, schedule)
    assert table is not None, key
    assert table.x_coeffs.shape == (table.evaluations, MAX_HISTORY) and table.step_ends[-1] == table.evaluations
    assert len(table.step_ends) == plan.steps
    assert table.noise_draws > 0 if spec.stochastic else table.noise_draws == 0
    model = _mixing_model(7)
    generator = TorchCompatibleGenerator(5)
    x0 = generator.randn((1, 4, 8, 8)) * np.float32(plan.initial_noise_scale)
    noise = np.stack([generator.randn((1, 4, 8, 8)) for _ in range(table.noise_draws)]) if table.noise_draws else None
    drawn = iter(noise if noise is not None else [])
    options = {"eta": 0.0} if spec.takes_eta else {}

    def counted(x, sigma):
        return model(x, sigma)

    counted.prediction_type = prediction_type
    expected = spec.run(counted, x0, plan, None, scheduler_config=spec.config_for(config), noise=lambda shape: next(drawn), **options)
    got = run_table(table, x0, lambda s, j: model(s, float(table.sigmas[j])), noise)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * max(1.0, float(np.abs(expected).max())))
    # the timesteps and scalings are the Denoiser's: a U-Net stand-in behind the numpy loop's Denoiser, and behind the
    # table's c_in, timesteps, c_skip and c_out as the kernel forms D_j, gives the same latents
    unet = _mixing_unet(7)
    denoiser = Denoiser(unet, prediction_type, lambda sigma: plan.timestep_for(sigma, schedule))
    drawn = iter(noise if noise is not None else [])
    expected = spec.run(denoiser, x0, plan, None, scheduler_config=spec.config_for(config), noise=lambda shape: next(drawn), **options)
    got = run_table(table, x0, lambda s, j: table.c_skip[j] * s + table.c_out[j] * unet(table.c_in[j] * s, float(table.timesteps[j])), noise)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * max(1.0, float(np.abs(expected).max())))


def test_no_table_where_the_update_is_not_linear(scheduler_config):
    schedule = NoiseSchedule.from_config(scheduler_config)
    sde = SAMPLERS["dpmpp_sde"]
    assert sampler_table(sde, sde.plan(scheduler_config, schedule, 8), scheduler_config, "epsilon", schedule) is None  # Brownian tree
    clipped = {**scheduler_config, "clip_sample": True, "clip_sample_range": 1.0}  # DDIM clamps x0: not linear in it
    ddim = SAMPLERS["ddim"]
    assert sampler_table(ddim, ddim.plan(clipped, schedule, 8), clipped, "epsilon", schedule) is None
    plain = {**scheduler_config, "clip_sample": False}
    assert sampler_table(ddim, ddim.plan(plain, schedule, 8), plain, "epsilon", schedule) is not None


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "heun", "lms", "unipc"])
def test_tabulated_loop_matches_the_samplers_through_the_engine(tiny_engine, sampler):
    """The device loop's arithmetic over the real U-Net engine gives the numpy samplers' latents (cfg combine included)."""
    request = GenerationRequest(prompt="a red bicycle", negative_prompt="blurry", steps=6, seed=21, sampler=sampler, cfg_scale=6.0)
    reference = Pipeline.load(tiny_engine, loop="numpy").generate(request)
    steps_seen = []
    tabulated = Pipeline.load(tiny_engine, loop="table").generate(request, on_step=lambda done, total: steps_seen.append((done, total)))
    scale = float(np.abs(reference.latents).max())
    np.testing.assert_allclose(tabulated.latents, reference.latents, rtol=0, atol=1e-5 * scale)
    assert steps_seen == [(i, 6) for i in range(1, 7)]
    assert len(tabulated.timings.unet_steps) == len(reference.timings.unet_steps)


class _CapturingUnet:
    """The U-Net engine with a table_loop that keeps the loop's inputs and runs the host loop."""

    def __init__(self, engine):
        self.engine, self.info, self.inputs = engine, engine.info, None

    def run(self, feeds):
        return self.engine.run(feeds)

    def table_loop(self, inputs, on_eval):
        self.inputs = inputs
        return run_on_host(self.engine, inputs, on_eval)


@pytest.mark.parametrize("sampler,stop_at", [("euler", 1), ("euler_a", 3), ("heun", 2), ("dpmpp_2m", 5)])
def test_stop_leaves_with_the_samplers_denoised_estimate(tiny_engine, monkeypatch, sampler, stop_at):
    """StopSampling from the step callback: run_on_host stops there, with the numpy sampler's x0 of that evaluation."""
    estimates = []

    class RecordingDenoiser(Denoiser):
        def __call__(self, x, sigma):
            estimates.append(super().__call__(x, sigma))
            return estimates[-1]

    request = GenerationRequest(prompt="a green door", negative_prompt="dark", steps=6, seed=5, sampler=sampler, cfg_scale=5.0)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline_module, "Denoiser", RecordingDenoiser)
        Pipeline.load(tiny_engine, loop="numpy").generate(request)
    pipeline = Pipeline.load(tiny_engine)
    unet = pipeline.engines["unet"] = _CapturingUnet(pipeline.engines["unet"])
    pipeline.generate(request)
    table = unet.inputs.table
    assert len(estimates) == table.evaluations
    last = int(table.step_ends[stop_at - 1])  # evaluations when step stop_at ends
    reported = []

    def stop(done, seconds):
        reported.append(done)
        if done == last:
            raise StopSampling("interrupted")

    with pytest.raises(StopSampling) as stopped:
        run_on_host(unet.engine, unet.inputs, stop)
    assert reported == list(range(1, last + 1)) and stopped.value.steps_run == stop_at
    expected = estimates[last - 1]  # [B, 4, h, w], x0: the same space as the loop's latents
    np.testing.assert_allclose(stopped.value.latents, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))
