"""The loop of a tabulated sampler with the guidance combine fused into each update.

One evaluation j is: the U-Net on the current input, then one fused update (native/sdfast_kernels.cu,
``sdfast_sampler_step``) that combines the guidance halves, forms D_j, advances the latents and writes the next U-Net
input and timestep. The GPU backends run that update on the device, so the latents stay there between steps;
``run_on_host`` runs the same arithmetic in numpy over any engine, which is how CI checks it against the samplers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sdfast.errors import EngineError, StopSampling
from sdfast.sampling.tables import StepTable

# (evaluations done, seconds the last one took: host time in numpy, device time between CUDA events on the GPU). Called
# once an evaluation has run; raising ends the loop between evaluations (StopSampling: see stopped()).
EvalCallback = Callable[[int, float], None]


def check_finite(stage: str, value: np.ndarray) -> np.ndarray:
    """``value``, or an EngineError naming ``stage`` when it holds NaN or inf (it would decode to a black image)."""
    if not np.isfinite(value).all():
        raise EngineError(f"{stage} produced NaN or inf; the image would be black (an fp16 overflow, or corrupt weights)")
    return value


@dataclass
class LoopInputs:
    table: StepTable
    x: np.ndarray  # [B, C, h, w] S_0: the initial latents, VE form
    conditioning: dict[str, np.ndarray]  # the denoiser's other inputs by name, each [R, ...], R = 2B with guidance (uncond rows first)
    cfg_scale: float
    use_cfg: bool  # combine the halves (cfg > 1), else take the conditional rows
    guided: bool  # the U-Net batch has both halves
    noise: np.ndarray | None  # [draws, B, C, h, w] the sampler's noise draws, in the order it makes them

    @property
    def unet_rows(self) -> int:
        return self.x.shape[0] * (2 if self.guided else 1)

    @property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The conditioning's names and shapes: the key of a device binding or CUDA graph made for them."""
        return tuple(sorted((name, tuple(value.shape)) for name, value in self.conditioning.items()))


@dataclass(frozen=True)
class StepScalars:
    """The kernel's scalar arguments for evaluation j (SdfastStepArgs without the pointers)."""

    state_coeffs: tuple[float, ...]
    estimate_coeffs: tuple[float, ...]
    noise_coeff: float
    draw: int  # -1: no noise
    c_skip: float
    c_out: float
    c_in_next: float
    timestep_next: float
    write_next: bool

    @classmethod
    def of(cls, table: StepTable, j: int) -> "StepScalars":
        last = j + 1 == table.evaluations
        return cls(
            tuple(float(c) for c in table.x_coeffs[j]), tuple(float(c) for c in table.d_coeffs[j]),
            float(table.noise_coeffs[j]), int(table.draws[j]), float(table.c_skip[j]), float(table.c_out[j]),
            0.0 if last else float(table.c_in[j + 1]), 0.0 if last else float(table.timesteps[j + 1]), not last,
        )


def guide(unet_out: np.ndarray, rows: int, guided: bool, use_cfg: bool, cfg_scale: float) -> np.ndarray:
    """The guided model output [B, C, h, w] from the U-Net's [R, C, h, w] (unconditional rows first)."""
    if not guided:
        return unet_out
    uncond, cond = unet_out[:rows], unet_out[rows:]
    return uncond + np.float32(cfg_scale) * (cond - uncond) if use_cfg else cond


def fused_step(scalars: StepScalars, guided_out: np.ndarray, states: list[np.ndarray], estimates: list[np.ndarray],
               noise: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(D_j, S_{j+1}) with the kernel's arithmetic; ``states`` and ``estimates`` newest first (estimates[0] is unused)."""
    f32 = np.float32
    denoised = f32(scalars.c_skip) * states[0] + f32(scalars.c_out) * guided_out
    result = np.zeros_like(states[0])
    for k in range(len(scalars.state_coeffs)):
        if scalars.state_coeffs[k] and k < len(states):
            result += f32(scalars.state_coeffs[k]) * states[k]
        if scalars.estimate_coeffs[k] and (k == 0 or k < len(estimates)):
            result += f32(scalars.estimate_coeffs[k]) * (denoised if k == 0 else estimates[k])
    if scalars.draw >= 0:
        result += f32(scalars.noise_coeff) * noise[scalars.draw]
    return denoised, result


def stopped(stop: StopSampling, table: StepTable, evaluations: int, denoised: np.ndarray) -> None:
    """``stop`` filled in by a loop that ran ``evaluations``: x0 of the last one [B, C, h, w] and the sampler steps completed."""
    stop.latents = denoised
    stop.steps_run = int(np.searchsorted(table.step_ends, evaluations, side="right"))


def run_on_host(unet, inputs: LoopInputs, on_eval: EvalCallback | None = None) -> np.ndarray:
    """The loop in numpy over ``unet`` (an Engine); returns S_M [B, C, h, w]. The reference for the device loops.

    ``on_eval`` is called after each evaluation; when it raises StopSampling, the error leaves with that evaluation's D_j.
    """
    table, rows = inputs.table, inputs.x.shape[0]
    in_channels = unet.info.input("sample").shape[1]
    if in_channels != inputs.x.shape[1]:
        raise EngineError(f"the tabulated loop runs text-to-image U-Nets; this one takes {in_channels} channels")
    states = [inputs.x.astype(np.float32)]
    estimates: list[np.ndarray] = [np.zeros_like(states[0])]
    sample = np.concatenate([states[0] * table.c_in[0]] * (2 if inputs.guided else 1))  # sample: [R, C, h, w]
    timestep = np.full((inputs.unet_rows,), table.timesteps[0], np.float32)
    for j in range(table.evaluations):
        started = time.perf_counter()
        unet_out = unet.run({**inputs.conditioning, "sample": sample, "timestep": timestep})[0]  # a step-cache U-Net has a second output
        check_finite("U-Net", unet_out)
        scalars = StepScalars.of(table, j)
        denoised, state = fused_step(scalars, guide(unet_out, rows, inputs.guided, inputs.use_cfg, inputs.cfg_scale),
                                     states, estimates, inputs.noise)
        estimates = [denoised, *estimates[1:]]
        states = [state, *states][: table.history]
        estimates = [np.zeros_like(state), *estimates][: table.history]  # slot 0 is D_{j+1}'s, written next time
        if scalars.write_next:
            sample = np.concatenate([state * np.float32(scalars.c_in_next)] * (2 if inputs.guided else 1))
            timestep = np.full((inputs.unet_rows,), scalars.timestep_next, np.float32)
        if on_eval:
            try:
                on_eval(j + 1, time.perf_counter() - started)
            except StopSampling as stop:
                stopped(stop, table, j + 1, denoised)
                raise
    return states[0]
