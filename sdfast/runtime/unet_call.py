"""One guided denoiser evaluation: the U-Net call (with ControlNet residuals, step caching, skip-layer guidance) and
classifier-free guidance (Ho and Salimans 2022) folded into one batch-2B call."""
from __future__ import annotations

import time

import numpy as np

from sdfast.runtime.device_loop import check_finite
from sdfast.runtime.generation import SkipLayerGuidance, StageTimings
from sdfast.runtime.guidance_truncation import COND, cond_rows
from sdfast.runtime.int8_unet import INT8, SHALLOW_INT8
from sdfast.runtime.step_cache import SHALLOW, CachedDenoiser


def guided_unet(pipeline, conditioning: dict[str, np.ndarray], cfg_scale: float, use_cfg: bool, timings: StageTimings,
                masked: np.ndarray | None, skip_layers: SkipLayerGuidance | None = None, steps: int = 0, control=None,
                step_cache: int | None = None, last_guided: int | None = None, int8: bool = False):
    """``predict(x_in, timestep)`` over ``pipeline``'s denoiser engine; ``control(x_rows, timesteps, timestep)`` gives the
    ControlNets' residuals for that call (None: the zeros in ``conditioning`` stay); ``step_cache``: DeepCache's interval;
    ``last_guided``: the last guided evaluation when guidance is truncated, after which the cond-only U-Net runs
    (runtime.guidance_truncation); None: every one is guided; ``int8``: the int8 U-Nets instead (runtime.int8_unet)."""
    engine = pipeline.engines[INT8 if int8 else pipeline.manifest.denoiser]
    label = pipeline.manifest.denoiser_label  # for errors
    guidance = pipeline.guidance
    unet_batch = pipeline.batch_size * (2 if guidance else 1)
    # skip-layer guidance (SD3.5): a third call on the prompt's rows with some blocks skipped, in part of the schedule
    skipping = pipeline.family.skip_layer_feeds(conditioning, skip_layers.layers) if skip_layers and use_cfg else None
    cached = CachedDenoiser(engine, pipeline.engines[SHALLOW_INT8 if int8 else SHALLOW], step_cache) if step_cache not in (None, 1) else None
    # the cond-only U-Net: after the guidance stop, or on every step when guidance is off (cfg <= 1)
    cond_engine = pipeline.engines.get(COND) if guidance else None
    if not use_cfg and step_cache in (None, 1) and not pipeline.loras.patched and not int8:
        last_guided = -1  # no guidance at all: every evaluation is the prompt's alone (LoRAs patch, int8 replaces, the guided U-Net only)
    cond_feeds = cond_rows(conditioning, [s.name for s in cond_engine.info.inputs if s.name in conditioning]) if cond_engine else {}
    evaluations = 0

    def predict(x_in: np.ndarray, timestep: float) -> np.ndarray:
        nonlocal evaluations
        evaluation, evaluations = evaluations, evaluations + 1
        # x_in: [B, 4, h, w], already scaled by c_in; masked: [B, 5, h, w] (mask, masked-image latents) or None
        sample = x_in if masked is None else np.concatenate([x_in, masked], axis=1)
        if cond_engine is not None and last_guided is not None and evaluation > last_guided and control is None:
            started = time.perf_counter()
            output = cond_engine.run({**cond_feeds, "sample": sample, "timestep": np.full((len(sample),), timestep, np.float32)})[0]
            timings.unet_steps.append(time.perf_counter() - started)
            return check_finite(label, output)  # the prompt's prediction alone, as diffusers with guidance_scale 0
        sample = np.concatenate([sample, sample]) if guidance else sample  # sample: [unet_batch, C, h, w]
        timesteps = np.full((unet_batch,), timestep, dtype=np.float32)
        started = time.perf_counter()
        feeds = conditioning
        if control is not None:  # the ControlNets see the latents without an inpainting U-Net's mask channels
            residuals = control(np.concatenate([x_in, x_in]) if guidance else x_in, timesteps, timestep)
            feeds = {**conditioning, **residuals} if residuals else conditioning
        feeds = {**feeds, "sample": sample, "timestep": timesteps}
        output = cached(feeds, evaluation) if cached else engine.run(feeds)[0]  # a step-cache U-Net has a second output
        timings.unet_steps.append(time.perf_counter() - started)
        check_finite(label, output)
        if not guidance:
            return output
        uncond, cond = np.split(output, 2)
        if not use_cfg:
            return cond
        guided = uncond + np.float32(cfg_scale) * (cond - uncond)
        if skipping is not None and skip_layers.active(evaluation, steps):
            skipped = engine.run({**skipping, "sample": sample, "timestep": timesteps})[0]
            skipped = check_finite(label, skipped)[: len(cond)]  # every row is the prompt's: the first half will do
            guided = guided + (cond - skipped) * np.float32(skip_layers.scale)
        return guided

    return predict
