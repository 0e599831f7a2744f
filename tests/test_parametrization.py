"""The parametrization module against diffusers: the denoiser's scalings, sigma -> timestep, and the refusal of the
schedulers and prediction types sdfast does not run (by name, never read as something else)."""
import json
import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from sdfast.errors import ConfigError
from sdfast.export.builtin import SD15_SCHEDULER_CONFIG
from sdfast.sampling.parametrization import check_prediction_type, sigma_to_timestep, sigmas_to_timesteps, denoiser_scalings
from sdfast.sampling.registry import check_supported
from sdfast.sampling.schedules import NoiseSchedule
from tests.conftest import run_cli, visible_lines


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_scalings_give_diffusers_x0_and_model_input(prediction_type):
    """c_in is Euler's scale_model_input; c_skip x + c_out F is the x0 its step computes (pred_original_sample)."""
    scheduler = EulerDiscreteScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    scheduler.set_timesteps(12)
    rng = np.random.default_rng(1)
    for index in (0, 5, 11):
        sigma = float(scheduler.sigmas[index])
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        output = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        c_in, c_skip, c_out = denoiser_scalings(sigma, prediction_type)
        scheduler._step_index = index
        expected_in = scheduler.scale_model_input(torch.from_numpy(x), scheduler.timesteps[index]).numpy()
        scheduler._step_index = index
        x0 = scheduler.step(torch.from_numpy(output), scheduler.timesteps[index], torch.from_numpy(x)).pred_original_sample.numpy()
        np.testing.assert_allclose(x * np.float32(c_in), expected_in, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x * np.float32(c_skip) + output * np.float32(c_out), x0, rtol=1e-5, atol=1e-5 * sigma)


def test_sigma_to_timestep_matches_diffusers():
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    train = NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG).sigmas
    sigmas = np.array([14.6, 7.3, 1.0, 0.5, 0.1, 0.03], np.float32)
    expected = scheduler._sigma_to_t(sigmas, np.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).numpy() ** 0.5))
    np.testing.assert_allclose(sigmas_to_timesteps(sigmas, train), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose([sigma_to_timestep(s, train) for s in sigmas], expected, rtol=1e-4, atol=1e-3)


def test_unknown_prediction_types_are_refused_by_name():
    assert check_prediction_type("v_prediction") == "v_prediction"
    assert check_prediction_type("flow_prediction") == "flow_prediction"
    with pytest.raises(ConfigError, match="prediction type 'sample' is not supported \\(x0-predicting"):
        check_prediction_type("sample")
    with pytest.raises(ConfigError, match="is a VP \\(DDPM\\) one, but its prediction type is flow_prediction"):
        check_supported({**SD15_SCHEDULER_CONFIG, "prediction_type": "flow_prediction"})
    with pytest.raises(ConfigError, match="prediction type 'banana' is not supported \\(unknown"):
        denoiser_scalings(1.0, "banana")


def test_scheduler_classes_outside_the_vp_family_are_refused_by_name():
    check_supported({**SD15_SCHEDULER_CONFIG, "_class_name": "DDPMScheduler"})
    check_supported({k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "_class_name"})  # no class named: the VP default
    check_supported({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})  # SD3's
    for name, kind in (("FlowMatchLCMScheduler", "flow matching"), ("EDMEulerScheduler", "EDM"),
                       ("CMStochasticIterativeScheduler", "not a VP")):
        with pytest.raises(ConfigError, match=f"the model's scheduler is {name} \\({kind}"):
            check_supported({"_class_name": name, "num_train_timesteps": 1000, "shift": 3.0})


def test_export_of_a_flow_matching_folder_stops_before_loading_weights(tiny_model, tmp_path):
    folder = tmp_path / "flow-model"
    shutil.copytree(tiny_model, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights: never read")
    started = time.monotonic()
    done = run_cli("export", "--model", folder, "--out", tmp_path / "engine")
    assert done.returncode != 0
    lines = visible_lines(done.stderr)
    assert "Traceback" not in done.stderr and lines[-1].startswith("sdfast export: error: the model's scheduler is "
                                                                   "FlowMatchEulerDiscreteScheduler (flow matching), but this model family samples with VP (DDPM) schedulers"), done.stderr
    assert not (tmp_path / "engine").exists() and time.monotonic() - started < 60
