"""The tabulated sampler loop on a CUDA device: the U-Net and one fused kernel per evaluation, queued on one stream.

Nothing crosses to the host between evaluations: the initial latents and the noise draws go up once, the final
latents come down once. The host only queues work, so its cost per step is two calls (the U-Net's and the kernel's
launch); the arithmetic is device_loop.fused_step's, which CI checks against the numpy samplers.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from sdfast.errors import EngineError
from sdfast.runtime.cuda_device import DeviceBuffer, Stream
from sdfast.runtime.device_loop import EvalCallback, LoopInputs, StepScalars, check_finite
from sdfast.runtime.native import HISTORY, Coefficients, Kernels, Pointers, StepArgs


class GpuLoop:
    """The ring of past latents and estimates for one latent shape, allocated once per engine."""

    def __init__(self, stream: Stream, kernels: Kernels, latent_shape: tuple[int, ...]):
        self.stream, self.kernels, self.latent_shape = stream, kernels, tuple(latent_shape)  # [B, C, h, w]
        self.states = [DeviceBuffer(latent_shape) for _ in range(HISTORY)]  # newest first
        self.estimates = [DeviceBuffer(latent_shape) for _ in range(HISTORY)]
        self.last: dict[str, float] = {}  # the last run: evaluations, wall seconds, host seconds spent queuing

    def run(self, inputs: LoopInputs, unet_in: int, timestep: int, unet_out: int, unet_row_stride: int,
            enqueue_unet: Callable[[], None], on_eval: EvalCallback | None) -> np.ndarray:
        """Queue every evaluation; ``unet_in``/``timestep`` already hold evaluation 0's input. Returns S_M on the host."""
        table, rows = inputs.table, inputs.x.shape[0]
        if tuple(inputs.x.shape) != self.latent_shape:
            raise EngineError(f"latents {inputs.x.shape} do not fit this engine's {self.latent_shape}")
        for buffer in (*self.states, *self.estimates):
            buffer.zero(self.stream)  # a 0 coefficient times stale NaN would still be NaN
        self.states[0].upload(inputs.x, self.stream)
        noise = None
        if inputs.noise is not None:
            noise = DeviceBuffer(inputs.noise.shape)
            noise.upload(inputs.noise, self.stream)
        per_row = int(np.prod(self.latent_shape[1:]))
        draw_bytes = rows * per_row * 4
        args = StepArgs(unet_out=unet_out, unet_in=unet_in, timestep=timestep, per_row=per_row, rows=rows,
                        unet_row_stride=unet_row_stride, guided=int(inputs.guided), use_cfg=int(inputs.use_cfg),
                        cfg_scale=float(inputs.cfg_scale))
        states, estimates = list(self.states), list(self.estimates)
        loop_started, host_seconds = time.perf_counter(), 0.0
        try:
            for j in range(table.evaluations):
                started = time.perf_counter()
                enqueue_unet()
                scalars = StepScalars.of(table, j)
                # states: S_j, S_{j-1}, ...; estimates: slot 0 unread (D_j is written to estimate_out), then D_{j-1}, ...
                args.states = Pointers(*(b.pointer for b in states))
                args.estimates = Pointers(estimates[-1].pointer, *(b.pointer for b in estimates[: HISTORY - 1]))
                args.estimate_out, args.state_out = estimates[-1].pointer, states[-1].pointer
                if scalars.draw >= 0 and noise is None:
                    raise EngineError(f"the sampler draws noise at evaluation {j}, but the loop was given none")
                args.noise = noise.pointer + scalars.draw * draw_bytes if scalars.draw >= 0 else None
                args.state_coeffs, args.estimate_coeffs = Coefficients(*scalars.state_coeffs), Coefficients(*scalars.estimate_coeffs)
                args.noise_coeff, args.c_skip, args.c_out = scalars.noise_coeff, scalars.c_skip, scalars.c_out
                args.c_in_next, args.timestep_next, args.write_next = scalars.c_in_next, scalars.timestep_next, int(scalars.write_next)
                self.kernels.sampler_step(args, self.stream.pointer)
                states = [states[-1], *states[:-1]]  # S_{j+1} went into the oldest slot
                estimates = [estimates[-1], *estimates[:-1]]  # D_j went into the oldest slot
                queued = time.perf_counter() - started
                host_seconds += queued
                if on_eval:
                    on_eval(j + 1, queued)
            final = states[0].download(self.stream)  # waits for the whole queue
            self.last = {"evaluations": table.evaluations, "wall_s": time.perf_counter() - loop_started, "host_s": host_seconds}
        finally:
            if noise is not None:
                self.stream.synchronize()
                noise.free()
        return check_finite("U-Net", final)

    def close(self) -> None:
        for buffer in (*self.states, *self.estimates):
            buffer.free()
