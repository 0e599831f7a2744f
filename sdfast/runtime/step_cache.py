"""Step caching at run time (DeepCache: Ma, Fang and Wang 2024, arXiv 2312.00858): which evaluations run the whole U-Net.

With interval N, model evaluations 0, N, 2N, ... run the full U-Net, which also returns its deep feature (the engine dir
was exported with ``--step-cache``); the evaluations in between run the shallow U-Net on that feature, DeepCache's uniform
schedule. Interval 1 runs the full U-Net every time: the exact image.
"""
from __future__ import annotations

import numpy as np

from sdfast.errors import RequestError

SHALLOW = "unet_shallow"  # the shallow U-Net's component (role denoiser_shallow)
FEATURE = "step_cache_feature"  # the full U-Net's second output, the shallow U-Net's extra input
MAX_INTERVAL = 10


def check_request(request, manifest, evaluates_twice: bool, backend: str) -> None:
    """RequestError for a step cache this engine dir or request cannot run (the LoRA check is ``check_loras``)."""
    interval = request.step_cache
    if interval is None:
        return
    if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= MAX_INTERVAL:
        raise RequestError(f"step cache interval must be an integer from 1 to {MAX_INTERVAL}, not {interval}")
    if SHALLOW not in manifest.components:
        raise RequestError("this engine dir has no shallow U-Net for step caching: export it with sdfast export --step-cache")
    denoiser = manifest.components[manifest.denoiser]
    if FEATURE not in [spec.name for spec in denoiser.outputs]:
        raise RequestError(f"this engine dir's {manifest.denoiser_label} does not return the step cache's feature: re-export it with --step-cache")
    if interval > 1 and backend != "cpu":
        raise RequestError(f"step caching runs on the cpu backend only yet, not on {backend}")
    if interval > 1 and evaluates_twice:
        raise RequestError("step caching counts one U-Net call per step: not with a sampler that evaluates twice per step yet")
    if request.control:
        raise RequestError("step caching does not run with ControlNets: the shallow U-Net takes no residuals")
    if request.refiner_switch is not None:
        raise RequestError("step caching does not run with a refiner hand-off")


def check_loras(request) -> None:
    """RequestError when a request with a fast mode whose extra graph LoRAs do not patch (the shallow U-Net, the
    cond-only U-Net, the int8 U-Net) asks for LoRAs, in ``loras`` or prompt tags."""
    from sdfast.runtime.lora.prompt_tags import extract_loras

    if not (request.loras or extract_loras(request.prompt)[1]):
        return
    if request.step_cache not in (None, 1):
        raise RequestError("step caching does not run with LoRAs yet: the shallow U-Net would keep the unpatched weights")
    if request.guidance_stop is not None and request.guidance_stop < 1:
        raise RequestError("guidance truncation does not run with LoRAs yet: the cond-only U-Net would keep the unpatched weights")
    if request.int8:
        raise RequestError("the int8 U-Net does not run with LoRAs: its weights are quantized (a LoRA patches the fp32 U-Net)")


class CachedDenoiser:
    """The U-Net engine call under step caching: the full U-Net on every ``interval``-th evaluation, keeping its
    feature, and the shallow U-Net on that feature in between."""

    def __init__(self, full, shallow, interval: int):
        self.full, self.shallow, self.interval = full, shallow, interval
        self.shallow_inputs = [spec.name for spec in shallow.info.inputs if spec.name != FEATURE]
        self.feature: np.ndarray | None = None  # feature: [2B, C, h, w], from the last full evaluation

    def __call__(self, feeds: dict[str, np.ndarray], evaluation: int) -> np.ndarray:
        if evaluation % self.interval == 0 or self.feature is None:
            noise, self.feature = self.full.run(feeds)[:2]
            return noise
        return self.shallow.run({**{name: feeds[name] for name in self.shallow_inputs}, FEATURE: self.feature})[0]


def infotext_value(interval: int | None) -> str | None:
    """The infotext's ``Step cache`` value, or None when every step ran the full U-Net."""
    return None if interval in (None, 1) else f"DeepCache every {interval}"
