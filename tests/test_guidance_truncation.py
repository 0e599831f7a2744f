"""Guidance truncation: the cond-only U-Net after the guidance stop, against diffusers' documented dynamic-CFG callback;
one copy of the U-Net's weights for both graphs; cfg <= 1 on the cond-only graph; refusals."""
from __future__ import annotations

import dataclasses

import diffusers
import numpy as np
import pytest
import torch

from sdfast.errors import ConfigError, RequestError
from sdfast.runtime.generation import GenerationRequest
from sdfast.runtime.images import psnr
from sdfast.runtime.pipeline import Pipeline
from tests.conftest import diffusers_reference, run_cli, visible_lines

PROMPT, NEGATIVE, STEPS = "a windmill in a tulip field", "blurry", 10


@pytest.fixture(scope="module")
def truncated_engine(tiny_model, tmp_path_factory):
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("guidance-truncation") / "engine"
    return export_engine(ExportRequest(model="tiny", out=out, guidance_truncation=True))


@pytest.fixture(scope="module")
def pipeline(truncated_engine):
    return Pipeline.load(truncated_engine)


def _counted(engine) -> list:
    calls, run = [], engine.run
    engine.run = lambda feeds: calls.append(len(feeds["sample"])) or run(feeds)
    return calls


def _dynamic_cfg(stop: float):
    """diffusers' documented dynamic classifier-free guidance: guidance off after step int(steps x stop)."""
    def callback(pipe, step_index, timestep, kwargs):
        if step_index == int(pipe.num_timesteps * stop):
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return kwargs
    return callback


@pytest.mark.parametrize("stop", [0.0, 0.4])
def test_truncated_guidance_matches_diffusers_dynamic_cfg(pipeline, tiny_model, stop):
    reference = diffusers_reference(tiny_model)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipeline.scheduler_config)
    expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
                         generator=torch.Generator("cpu").manual_seed(11), callback_on_step_end=_dynamic_cfg(stop),
                         callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    guided, cond = _counted(pipeline.engines["unet"]), _counted(pipeline.engines["unet_cond"])
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, seed=11, guidance_stop=stop))
    assert psnr(result.images, (expected * 255).round().astype(np.uint8)) >= 40.0
    kept = int(STEPS * stop) + 1
    assert guided == [2] * kept and cond == [1] * (STEPS - kept)  # the last steps ran the batch-1 graph
    assert f"Guidance stop: {stop}," in result.parameters[0]
    exact = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, seed=11))
    assert psnr(result.images, exact.images) < 60  # it is another image


def test_both_graphs_compute_from_one_copy_of_the_weights(pipeline, truncated_engine):
    from sdfast.runtime.manifest import read_manifest

    components = read_manifest(truncated_engine).data["components"]
    assert components["unet"]["shared_weights"]["file"] == components["unet_cond"]["shared_weights"]["file"] == "unet.weights"
    assert not list(truncated_engine.glob("unet*.onnx.data"))
    pointers = [{v.data_ptr() for v in pipeline.engines[name].shared_weights[1:]} for name in ("unet", "unet_cond")]
    assert len(pointers[0]) > 50 and len(pointers[0] & pointers[1]) > 0.9 * len(pointers[0])


def test_cfg_one_runs_the_cond_only_graph_on_every_step(pipeline, tiny_engine):
    guided, cond = _counted(pipeline.engines["unet"]), _counted(pipeline.engines["unet_cond"])
    request = GenerationRequest(PROMPT, steps=5, cfg_scale=1.0, seed=2)
    result = pipeline.generate(request)
    assert guided == [] and cond == [1] * 5
    assert psnr(result.images, Pipeline.load(tiny_engine).generate(request).images) >= 60  # the same unguided image


def test_refusals(pipeline, tiny_engine, tmp_path):
    request = GenerationRequest(PROMPT, steps=4, guidance_stop=0.5)
    with pytest.raises(RequestError, match="export --guidance-truncation"):
        Pipeline.load(tiny_engine).validate(request)
    for stop in (-0.1, 1.5, True):
        with pytest.raises(RequestError, match="guidance stop must be a fraction"):
            pipeline.validate(dataclasses.replace(request, guidance_stop=stop))
    with pytest.raises(RequestError, match="a sampler that evaluates twice"):
        pipeline.validate(dataclasses.replace(request, sampler="heun"))
    with pytest.raises(RequestError, match="guidance truncation does not run with LoRAs yet"):
        pipeline.validate(dataclasses.replace(request, prompt="a cat <lora:ink:0.7>"))
    pipeline.validate(request)
    from sdfast.export.build import ExportRequest, check_request

    with pytest.raises(ConfigError, match="needs classifier-free guidance"):
        check_request(ExportRequest(model="tiny", out=tmp_path / "a", guidance=False, guidance_truncation=True))
    with pytest.raises(ConfigError, match="with --size is not supported yet"):
        check_request(ExportRequest(model="tiny", out=tmp_path / "b", sizes=((96, 64),), guidance_truncation=True))
    refused = run_cli("generate", str(tiny_engine), PROMPT, "--steps", "3", "--guidance-stop", "0.5", "-o", str(tmp_path / "x.png"))
    assert refused.returncode == 2 and "export --guidance-truncation" in visible_lines(refused.stderr)[-1]
