"""Each sampler's full loop against diffusers' scheduler, on the same deterministic stand-in model and noise."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdfast.errors import RequestError
from sdfast.sampling.registry import resolve_sampler, sampler_names
from tests.sampler_harness import SD15_SCHEDULER, relative_error, run_diffusers, run_sdfast

@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler,cls_name", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler")])
def test_sampler_matches_diffusers(sampler, cls_name, spacing, prediction_type, steps):
    config = dict(SD15_SCHEDULER)
    if spacing:
        config["timestep_spacing"] = spacing
    reference = run_diffusers(cls_name, config, steps, seed=3, prediction_type=prediction_type)
    ours = run_sdfast(sampler, config, steps, seed=3, prediction_type=prediction_type)
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("steps", [4, 20])
def test_ddim_eta_and_clip_match_diffusers(steps):
    config = {**SD15_SCHEDULER, "clip_sample": True, "set_alpha_to_one": True}
    reference = run_diffusers("DDIMScheduler", config, steps, seed=11, prediction_type="epsilon", eta=0.7)
    ours = run_sdfast("ddim", config, steps, seed=11, prediction_type="epsilon", eta=0.7)
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("name", ["Euler", "euler", "EULERDISCRETESCHEDULER", "ddim", "DDIMScheduler"])
def test_sampler_names_resolve_case_insensitively(name):
    assert resolve_sampler(name).key in {"euler", "ddim"}


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(RequestError) as error:
        resolve_sampler("Euler z")
    for name in sampler_names():
        assert name in str(error.value)
