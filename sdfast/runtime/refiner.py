"""SDXL's ensemble of expert denoisers: the base runs the high-noise part of the schedule, the refiner the rest.

As diffusers' ``denoising_end`` on the base and ``denoising_start`` on the refiner (Podell et al. 2023, "SDXL", sec. 2.5;
Balaji et al. 2022, "eDiff-I"): the switch fraction s cuts the training timesteps at round(T - s T); the base runs the
steps whose timestep is at or above the cut and hands its latents over, unfinished, to the refiner, which runs the
steps below it with its own conditioning and decodes with its own VAE. Both draw from generators seeded alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdfast.errors import EngineError, RequestError

if TYPE_CHECKING:
    from sdfast.runtime.pipeline import Pipeline
    from sdfast.sampling.schedules import SamplingPlan


class HandOff(Exception):
    """Raised from the base's step callback once its share of the steps is done, carrying x [B, C, h, w] in VE form."""

    def __init__(self, latents: np.ndarray):
        super().__init__("hand-off to the refiner")
        self.latents = latents


@dataclass
class LatentSource:
    """The refiner's start: the base's unfinished latents, taken as they are (no VAE, no added noise)."""

    latents: np.ndarray  # [B, C, h, w], VE form at the refiner plan's first sigma

    def initial_latents(self, draw, plan, strength, inpainting_unet):
        return self.latents, None

    def blends(self, inpainting_unet: bool) -> bool:
        return False


def cutoff_timestep(switch: float, train_timesteps: int) -> int:
    """diffusers' discrete_timestep_cutoff: the timestep where the base stops and the refiner starts."""
    return int(round(train_timesteps - switch * train_timesteps))


def base_steps(plan: "SamplingPlan", switch: float, train_timesteps: int) -> int:
    """How many steps of the base's plan run before the switch (diffusers' denoising_end)."""
    return int((plan.timesteps >= cutoff_timestep(switch, train_timesteps)).sum())


def refiner_start(plan: "SamplingPlan", switch: float, train_timesteps: int) -> int:
    """The step of the refiner's plan it starts from (diffusers' get_timesteps with denoising_start, first-order order)."""
    return len(plan.timesteps) - int((plan.timesteps < cutoff_timestep(switch, train_timesteps)).sum())


def check_switch(switch) -> float:
    """The fraction of the schedule the base runs (A1111's refiner_switch_at, diffusers' denoising_end), from 0 to 1 exclusive."""
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0.0 < switch < 1.0:
        raise RequestError(f"refiner switch must be a number between 0 and 1 (exclusive), not {switch}")
    return float(switch)


def check_pair(refiner: "Pipeline", base: "Pipeline") -> None:
    """The refiner must take the base's latents as they are: same latent layout, size, batch and guidance."""
    mine, theirs = refiner, base
    if mine.family.latent != theirs.family.latent or mine.latent_shape != theirs.latent_shape:
        raise EngineError(f"the refiner's latents ({mine.latent_shape}, {mine.family.latent}) are not the base's "
                          f"({theirs.latent_shape}, {theirs.family.latent}): export both at one size")
    if mine.batch_size != theirs.batch_size or mine.guidance != theirs.guidance:
        raise EngineError(f"the refiner was exported for batch {mine.batch_size} {'with' if mine.guidance else 'without'} guidance, "
                          f"the base for batch {theirs.batch_size} {'with' if theirs.guidance else 'without'}: export both alike")
