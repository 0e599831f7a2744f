"""The tabulated sampler loop on a CUDA device: the U-Net and one fused kernel per evaluation, queued on one stream.

Nothing crosses to the host between evaluations: the initial latents and the noise draws go up once, the final
latents come down once. The host queues work and records a CUDA event after each evaluation; it reports an evaluation
(``on_eval``) when its event has completed, and queues at most AHEAD evaluations past the last one reported, so the
progress is what has run and a callback that raises stops the loop between evaluations. The arithmetic is
native/sdfast_step.h's, which the tests run on the host against device_loop.fused_step and the numpy samplers.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, NamedTuple

import numpy as np

from sdfast.errors import EngineError, StopSampling
from sdfast.runtime.cuda_device import DeviceBuffer, Event, Stream
from sdfast.runtime.device_loop import EvalCallback, LoopInputs, StepScalars, check_finite, stopped
from sdfast.runtime.native import HISTORY, Coefficients, Kernels, Pointers, StepArgs

# Evaluations the device may run past the last one reported: enough to hide the host's queuing, few enough that a stop
# wastes little. Below HISTORY, so D_j's ring slot (rewritten by evaluation j + HISTORY) is intact when j is reported.
AHEAD = 2


class _Queued(NamedTuple):
    evaluation: int  # j
    end: Event  # recorded after evaluation j's kernel
    estimate: DeviceBuffer  # the slot D_j went into


class GpuLoop:
    """The ring of past latents and estimates for one latent shape, and the loop's events, allocated once per engine."""

    def __init__(self, stream: Stream, kernels: Kernels, latent_shape: tuple[int, ...]):
        self.stream, self.kernels, self.latent_shape = stream, kernels, tuple(latent_shape)  # [B, C, h, w]
        self.states = [DeviceBuffer(latent_shape) for _ in range(HISTORY)]  # newest first
        self.estimates = [DeviceBuffer(latent_shape) for _ in range(HISTORY)]
        # evaluation j ends at events[j % len]: a slot is recorded again only after the evaluation after it is reported
        self.events = [Event() for _ in range(AHEAD + 2)]
        self.start = Event()
        self.last: dict[str, float] = {}  # the last run: evaluations run, wall seconds, host seconds spent queuing

    def run(self, inputs: LoopInputs, unet_in: int, timestep: int, unet_out: int, unet_row_stride: int,
            enqueue_unet: Callable[[], None], on_eval: EvalCallback | None) -> np.ndarray:
        """Run every evaluation; ``unet_in``/``timestep`` already hold evaluation 0's input. Returns S_M on the host.

        When ``on_eval`` raises, the queued work is waited for, the noise freed and the error re-raised; a StopSampling
        leaves with the reported evaluation's D_j (device_loop.stopped), as run_on_host's.
        """
        table, rows = inputs.table, inputs.x.shape[0]
        if tuple(inputs.x.shape) != self.latent_shape:
            raise EngineError(f"latents {inputs.x.shape} do not fit this engine's {self.latent_shape}")
        if table.noise_draws and (inputs.noise is None or len(inputs.noise) < table.noise_draws):
            raise EngineError(f"the sampler draws noise {table.noise_draws} times, but the loop was given "
                              f"{0 if inputs.noise is None else len(inputs.noise)} draws")
        for buffer in (*self.states, *self.estimates):
            buffer.zero(self.stream)  # a 0 coefficient times stale NaN would still be NaN
        self.states[0].upload(inputs.x, self.stream)
        noise = None
        if table.noise_draws:
            noise = DeviceBuffer(inputs.noise.shape)  # [draws, B, C, h, w]
        loop_started, host_seconds, evaluations, failed = time.perf_counter(), 0.0, 0, True
        try:
            if noise is not None:
                noise.upload(inputs.noise, self.stream)
            args = StepArgs(unet_out=unet_out, unet_in=unet_in, timestep=timestep, per_row=int(np.prod(self.latent_shape[1:])),
                            rows=rows, unet_row_stride=unet_row_stride, guided=int(inputs.guided), use_cfg=int(inputs.use_cfg),
                            cfg_scale=float(inputs.cfg_scale))
            states, estimates = list(self.states), list(self.estimates)
            queued: deque[_Queued] = deque()  # run or running, not yet reported
            previous = self.start
            self.start.record(self.stream)
            for j in range(table.evaluations):
                started = time.perf_counter()
                enqueue_unet()
                self._set_step(args, StepScalars.of(table, j), states, estimates, noise)
                self.kernels.sampler_step(args, self.stream.pointer)
                end = self.events[j % len(self.events)]
                end.record(self.stream)
                queued.append(_Queued(j, end, estimates[-1]))
                evaluations += 1
                states = [states[-1], *states[:-1]]  # S_{j+1} went into the oldest slot
                estimates = [estimates[-1], *estimates[:-1]]  # D_j went into the oldest slot
                host_seconds += time.perf_counter() - started
                while queued and (len(queued) > AHEAD or queued[0].end.query()):  # what has run; wait only when AHEAD
                    previous = self._report(queued.popleft(), previous, table, on_eval)
            while queued:
                previous = self._report(queued.popleft(), previous, table, on_eval)
            final = states[0].download(self.stream)
            failed = False
        finally:
            self._drain(noise, quiet=failed)
            self.last = {"evaluations": evaluations, "wall_s": time.perf_counter() - loop_started, "host_s": host_seconds}
        return check_finite("U-Net", final)

    def _set_step(self, args: StepArgs, scalars: StepScalars, states: list[DeviceBuffer], estimates: list[DeviceBuffer],
                  noise: DeviceBuffer | None) -> None:
        """Evaluation j's kernel arguments; ``states`` S_j, S_{j-1}, ... and ``estimates`` D_{j-1}, ... in slots 1.., newest first."""
        # estimates: slot 0 unread (D_j is written to estimate_out, the oldest slot), then D_{j-1}, ...
        args.states = Pointers(*(b.pointer for b in states))
        args.estimates = Pointers(estimates[-1].pointer, *(b.pointer for b in estimates[: HISTORY - 1]))
        args.estimate_out, args.state_out = estimates[-1].pointer, states[-1].pointer
        draw_bytes = int(np.prod(self.latent_shape)) * 4  # one draw: [B, C, h, w] float32
        args.noise = noise.pointer + scalars.draw * draw_bytes if scalars.draw >= 0 else None
        args.state_coeffs, args.estimate_coeffs = Coefficients(*scalars.state_coeffs), Coefficients(*scalars.estimate_coeffs)
        args.noise_coeff, args.c_skip, args.c_out = scalars.noise_coeff, scalars.c_skip, scalars.c_out
        args.c_in_next, args.timestep_next, args.write_next = scalars.c_in_next, scalars.timestep_next, int(scalars.write_next)

    def _report(self, queued: _Queued, previous: Event, table, on_eval: EvalCallback | None) -> Event:
        """Wait for evaluation j to have run, then tell ``on_eval`` with its device time; a StopSampling gets D_j."""
        queued.end.synchronize()
        if on_eval:
            try:
                on_eval(queued.evaluation + 1, queued.end.seconds_since(previous))
            except StopSampling as stop:
                # D_j's slot is rewritten HISTORY evaluations later; at most AHEAD are queued past j
                stopped(stop, table, queued.evaluation + 1, queued.estimate.download(self.stream))
                raise
        return queued.end

    def _drain(self, noise: DeviceBuffer | None, quiet: bool) -> None:
        """Wait for everything queued (it reads the noise and the ring), then free the noise; ``quiet``: an error is leaving."""
        try:
            self.stream.synchronize()
        except EngineError:
            if not quiet:
                raise
        finally:
            if noise is not None:
                noise.free()

    def close(self) -> None:
        for buffer in (*self.states, *self.estimates):
            buffer.free()
        for event in (*self.events, self.start):
            event.close()
