"""The device loop's host side (gpu_loop.GpuLoop) on host memory: ring rotation, pointers and StepArgs marshalling.

The kernel is native/sdfast_step.h compiled for the host by nvcc (tests/host_kernels.py), handed the same ctypes
struct and raw pointers the real launch gets, so what this checks is the GPU's arithmetic on exactly what it would be
handed.
"""
import numpy as np
import pytest

from sdfast.runtime import gpu_loop
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.host_kernels import host_step  # noqa: F401 - the fixture


class HostBuffer:
    def __init__(self, shape, dtype=np.float32):
        self.shape, self.array = tuple(shape), np.zeros(shape, dtype)
        self.pointer = self.array.ctypes.data

    def upload(self, array, stream):
        flat = np.ascontiguousarray(array, self.array.dtype).reshape(-1)
        self.array.reshape(-1)[: flat.size] = flat

    def download(self, stream, shape=None):
        return self.array.copy() if shape is None else self.array.reshape(-1)[: int(np.prod(shape))].reshape(shape).copy()

    def zero(self, stream):
        self.array[...] = 0

    def free(self):
        pass


class HostStream:
    pointer, handle = 0, None

    def synchronize(self):
        pass


class HostKernels:
    """sdfast_sampler_step with the kernel's arithmetic, run on the host."""

    def __init__(self, host_step):
        self.host_step, self.launches = host_step, 0

    def sampler_step(self, args, stream):
        self.launches += 1
        assert self.host_step.sampler_step(args) == 0


class HostMemoryUnet:
    """The CPU U-Net engine behind the device loop's interface, its buffers in host memory."""

    def __init__(self, engine, kernels):
        self.engine, self.info, self.kernels = engine, engine.info, kernels
        self._loop = None

    def run(self, feeds):
        return self.engine.run(feeds)

    def table_loop(self, inputs, on_eval):
        rows, shape = inputs.unet_rows, self.info.input("sample").shape
        sample, timestep = HostBuffer((rows, *shape[1:])), HostBuffer((rows,))
        output = HostBuffer((rows, *self.info.outputs[0].shape[1:]))
        sample.upload(np.concatenate([inputs.x * inputs.table.c_in[0]] * (2 if inputs.guided else 1)), None)
        timestep.upload(np.full(rows, inputs.table.timesteps[0], np.float32), None)

        def enqueue():
            output.array[...] = self.engine.run({"sample": sample.array, "timestep": timestep.array, "encoder_hidden_states": inputs.hidden})[0]

        self._loop = self._loop or gpu_loop.GpuLoop(HostStream(), self.kernels, inputs.x.shape)
        return self._loop.run(inputs, sample.pointer, timestep.pointer, output.pointer, int(np.prod(shape[1:])), enqueue, on_eval)


@pytest.mark.parametrize("sampler,cfg", [("euler_a", 7.0), ("dpmpp_2m", 5.0), ("lms", 1.0), ("heun", 3.0)])
def test_gpu_loop_host_side_matches_the_samplers(tiny_engine, monkeypatch, host_step, sampler, cfg):
    monkeypatch.setattr(gpu_loop, "DeviceBuffer", HostBuffer)
    request = GenerationRequest(prompt="an orange tram", steps=5, seed=4, sampler=sampler, cfg_scale=cfg)
    reference = Pipeline.load(tiny_engine, loop="numpy").generate(request)
    pipeline = Pipeline.load(tiny_engine)
    kernels = HostKernels(host_step)
    pipeline.engines["unet"] = HostMemoryUnet(pipeline.engines["unet"], kernels)
    result = pipeline.generate(request)
    table_evaluations = len(result.timings.unet_steps)
    assert kernels.launches == table_evaluations == len(reference.timings.unet_steps)
    scale = float(np.abs(reference.latents).max())
    np.testing.assert_allclose(result.latents, reference.latents, rtol=0, atol=1e-5 * scale)
    assert np.array_equal(result.images, reference.images) or np.abs(result.images.astype(int) - reference.images).max() <= 1
    last = pipeline.engines["unet"]._loop.last
    assert last["evaluations"] == table_evaluations and last["wall_s"] >= last["host_s"] > 0
    assert result.timings.host_queue_s == last["host_s"]
