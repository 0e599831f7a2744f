"""The device loop's host side (gpu_loop.GpuLoop) on a simulated device, with the kernel's own arithmetic.

The stream is simulated on the host: queued work runs only when something waits for it (an event, a copy, a
synchronize), as late as a GPU may run it, so these tests see what the loop reports before its work has run. The
kernel is native/sdfast_step.h compiled for the host by nvcc (tests/host_kernels.py), handed the same ctypes struct
and raw pointers the real launch gets. The U-Net is the tiny CPU engine reading and writing the loop's buffers.
"""
import time
from collections import deque

import numpy as np
import pytest

from sdfast.errors import StopSampling
from sdfast.runtime import gpu_loop
from sdfast.runtime.device_loop import run_on_host
from sdfast.runtime.native import StepArgs
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.host_kernels import host_step  # noqa: F401 - the fixture


class SimulatedStream:
    """A CUDA stream on the host: work is queued, and runs in order only when the host waits for it."""

    pointer, handle = 0, None

    def __init__(self):
        self.pending: deque = deque()

    def queue(self, work) -> None:
        self.pending.append(work)

    def run_until(self, done=lambda: False) -> None:
        while self.pending and not done():
            self.pending.popleft()()

    def synchronize(self) -> None:
        self.run_until()


class SimulatedEvent:
    def __init__(self):
        self.stream, self.done, self.at = None, True, 0.0

    def record(self, stream):
        def mark():
            self.done, self.at = True, time.perf_counter()

        self.stream, self.done = stream, False
        stream.queue(mark)

    def query(self):
        return self.done

    def synchronize(self):
        self.stream.run_until(lambda: self.done)

    def seconds_since(self, earlier):
        assert self.done and earlier.done, "elapsed time of an event that has not completed"
        return self.at - earlier.at

    def close(self):
        pass


class SimulatedBuffer:
    """Device memory on the host; copies wait for the stream as cudaMemcpyAsync + synchronize do, memset is queued."""

    made: list = []

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.array, self.freed = tuple(shape), np.zeros(shape, dtype), False
        self.pointer = self.array.ctypes.data
        SimulatedBuffer.made.append(self)

    def upload(self, array, stream):
        stream.synchronize()
        flat = np.ascontiguousarray(array, self.array.dtype).reshape(-1)
        self.array.reshape(-1)[: flat.size] = flat

    def download(self, stream, shape=None):
        stream.synchronize()
        return self.array.copy() if shape is None else self.array.reshape(-1)[: int(np.prod(shape))].reshape(shape).copy()

    def zero(self, stream):
        stream.queue(lambda: self.array.fill(0))

    def free(self):
        self.freed = True


class HostKernels:
    """sdfast_sampler_step on the simulated stream: the arguments copied at launch (as a kernel's are), run when reached."""

    def __init__(self, host_step, stream: SimulatedStream):
        self.host_step, self.stream = host_step, stream
        self.queued = self.ran = 0

    def sampler_step(self, args, stream):
        launched = StepArgs.from_buffer_copy(args)

        def run():
            assert self.host_step.sampler_step(launched) == 0
            self.ran += 1

        self.queued += 1
        self.stream.queue(run)


class HostMemoryUnet:
    """The CPU U-Net engine behind the device loop's interface, its buffers in simulated device memory."""

    def __init__(self, engine, kernels: HostKernels):
        self.engine, self.info, self.kernels = engine, engine.info, kernels
        self._loop, self.inputs = None, None

    def run(self, feeds):
        return self.engine.run(feeds)

    def table_loop(self, inputs, on_eval):
        self.inputs = inputs
        rows, shape, stream = inputs.unet_rows, self.info.input("sample").shape, self.kernels.stream
        sample, timestep = SimulatedBuffer((rows, *shape[1:])), SimulatedBuffer((rows,))
        output = SimulatedBuffer((rows, *self.info.outputs[0].shape[1:]))
        sample.upload(np.concatenate([inputs.x * inputs.table.c_in[0]] * (2 if inputs.guided else 1)), stream)
        timestep.upload(np.full(rows, inputs.table.timesteps[0], np.float32), stream)

        def unet():
            output.array[...] = self.engine.run({**inputs.conditioning, "sample": sample.array, "timestep": timestep.array})[0]

        self._loop = self._loop or gpu_loop.GpuLoop(stream, self.kernels, inputs.x.shape)
        return self._loop.run(inputs, sample.pointer, timestep.pointer, output.pointer, int(np.prod(shape[1:])),
                              lambda: stream.queue(unet), on_eval)


@pytest.fixture
def simulated(monkeypatch, host_step):
    monkeypatch.setattr(gpu_loop, "DeviceBuffer", SimulatedBuffer)
    monkeypatch.setattr(gpu_loop, "Event", SimulatedEvent)
    SimulatedBuffer.made = []
    return HostKernels(host_step, SimulatedStream())


def _noise_buffers(inputs) -> list:
    return [b for b in SimulatedBuffer.made if inputs.noise is not None and b.shape == inputs.noise.shape]


def _on_device(tiny_engine, kernels: HostKernels) -> Pipeline:
    pipeline = Pipeline.load(tiny_engine)
    pipeline.engines["unet"] = HostMemoryUnet(pipeline.engines["unet"], kernels)
    return pipeline


@pytest.mark.parametrize("sampler,cfg", [("euler_a", 7.0), ("dpmpp_2m", 5.0), ("lms", 1.0), ("heun", 3.0)])
def test_gpu_loop_host_side_matches_the_samplers(simulated, tiny_engine, sampler, cfg):
    request = GenerationRequest(prompt="an orange tram", steps=5, seed=4, sampler=sampler, cfg_scale=cfg)
    reference = Pipeline.load(tiny_engine, loop="numpy").generate(request)
    pipeline = _on_device(tiny_engine, simulated)
    result = pipeline.generate(request)
    table_evaluations = len(result.timings.unet_steps)
    assert simulated.ran == simulated.queued == table_evaluations == len(reference.timings.unet_steps)
    scale = float(np.abs(reference.latents).max())
    np.testing.assert_allclose(result.latents, reference.latents, rtol=0, atol=1e-5 * scale)
    assert np.array_equal(result.images, reference.images) or np.abs(result.images.astype(int) - reference.images).max() <= 1
    last = pipeline.engines["unet"]._loop.last
    assert last["evaluations"] == table_evaluations and last["wall_s"] >= last["host_s"] > 0
    assert result.timings.host_queue_s == last["host_s"]
    assert all(b.freed for b in _noise_buffers(pipeline.engines["unet"].inputs))


def test_progress_is_reported_when_an_evaluation_has_run(simulated, tiny_engine):
    """on_eval(n) comes after evaluation n has run on the device, which runs at most AHEAD evaluations past it."""
    pipeline = _on_device(tiny_engine, simulated)
    pipeline.generate(GenerationRequest(prompt="a kite", steps=6, seed=2, sampler="heun", cfg_scale=4.0))
    unet, seen = pipeline.engines["unet"], []
    simulated.ran = simulated.queued = 0
    unet.table_loop(unet.inputs, lambda done, seconds: seen.append((done, simulated.ran, simulated.queued, seconds)))
    assert [done for done, *_ in seen] == list(range(1, unet.inputs.table.evaluations + 1))
    for done, ran, queued, seconds in seen:
        assert ran >= done, f"evaluation {done} reported when {ran} had run"
        assert queued <= done + gpu_loop.AHEAD, f"{queued} evaluations queued when {done} was reported"
        assert seconds > 0


@pytest.mark.parametrize("sampler,stop_at", [("euler_a", 2), ("dpmpp_2m", 4), ("heun", 3)])
def test_stop_between_steps_leaves_with_the_denoised_latents(simulated, tiny_engine, sampler, stop_at):
    """A callback's StopSampling ends the loop: the same D_j and step count as run_on_host, the queue drained, noise freed."""
    pipeline = _on_device(tiny_engine, simulated)
    request = GenerationRequest(prompt="a red bus", negative_prompt="fog", steps=6, seed=9, sampler=sampler, cfg_scale=6.0)
    full = pipeline.generate(request)
    unet = pipeline.engines["unet"]
    inputs, stop_eval = unet.inputs, int(unet.inputs.table.step_ends[stop_at - 1])  # the evaluation that ends step stop_at

    def stop(done, seconds):
        if done == stop_eval:
            raise StopSampling("interrupted")

    with pytest.raises(StopSampling) as on_host:
        run_on_host(unet.engine, inputs, stop)
    queued_before, SimulatedBuffer.made = simulated.queued, []
    with pytest.raises(StopSampling) as on_device:
        unet.table_loop(inputs, stop)
    assert on_device.value.steps_run == on_host.value.steps_run == stop_at
    assert on_device.value.latents.shape == inputs.x.shape
    scale = float(np.abs(on_host.value.latents).max())
    np.testing.assert_allclose(on_device.value.latents, on_host.value.latents, rtol=0, atol=1e-5 * scale)
    queued = simulated.queued - queued_before
    assert stop_eval <= queued <= stop_eval + gpu_loop.AHEAD, "the loop kept queuing after the stop"
    assert not simulated.stream.pending and simulated.ran == simulated.queued, "work left on the stream"
    assert all(b.freed for b in _noise_buffers(inputs)), "the noise draws were not freed"
    assert unet._loop.last["evaluations"] == queued
    again = pipeline.generate(request)  # the loop is reusable after a stop
    np.testing.assert_array_equal(again.latents, full.latents)


def test_any_callback_error_stops_the_loop_cleanly(simulated, tiny_engine):
    """The server's cancel is not a StopSampling: it leaves as raised, after the queued work, with the noise freed."""
    pipeline = _on_device(tiny_engine, simulated)
    pipeline.generate(GenerationRequest(prompt="a boat", steps=5, seed=1, sampler="euler_a", cfg_scale=5.0))
    unet, cancelled = pipeline.engines["unet"], RuntimeError("cancelled")
    SimulatedBuffer.made = []

    def cancel(done, seconds):
        if done == 2:
            raise cancelled

    with pytest.raises(RuntimeError) as raised:
        unet.table_loop(unet.inputs, cancel)
    assert raised.value is cancelled
    assert not simulated.stream.pending and simulated.ran == simulated.queued
    noise = _noise_buffers(unet.inputs)
    assert len(noise) == 1 and noise[0].freed
    assert unet._loop.last["evaluations"] <= 2 + gpu_loop.AHEAD
