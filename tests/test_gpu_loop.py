"""The device loop's host side (gpu_loop.GpuLoop) on host memory: ring rotation, pointers and StepArgs marshalling.

The CUDA kernel is replaced by a line-by-line numpy transcription of native/sdfast_kernels.cu that reads its
arguments through the same ctypes struct and raw pointers the real launch gets, so what this checks is exactly what
the GPU would be handed. The kernel's own arithmetic is device_loop.fused_step's (test_sampler_tables.py).
"""
import ctypes

import numpy as np
import pytest

from sdfast.runtime import gpu_loop
from sdfast.runtime.pipeline import GenerationRequest, Pipeline


def _view(pointer: int, count: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(pointer))


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


class TranscribedKernels:
    """sampler_step_kernel of native/sdfast_kernels.cu, over all elements at once."""

    def __init__(self):
        self.launches = 0

    def sampler_step(self, a, stream):
        self.launches += 1
        total = a.per_row * a.rows
        if a.guided:
            out = _view(a.unet_out, 2 * total)
            uncond, cond = out[:total], out[total:]
            guided = uncond + np.float32(a.cfg_scale) * (cond - uncond) if a.use_cfg else cond
        else:
            guided = _view(a.unet_out, total)
        states = [_view(a.states[k], total) if a.states[k] else None for k in range(4)]
        denoised = np.float32(a.c_skip) * states[0] + np.float32(a.c_out) * guided
        result = np.zeros(total, np.float32)
        for k in range(4):
            if a.state_coeffs[k] != 0.0:
                result += np.float32(a.state_coeffs[k]) * states[k]
            if a.estimate_coeffs[k] != 0.0:
                result += np.float32(a.estimate_coeffs[k]) * (denoised if k == 0 else _view(a.estimates[k], total))
        if a.noise:
            result += np.float32(a.noise_coeff) * _view(a.noise, total)
        _view(a.estimate_out, total)[:] = denoised
        _view(a.state_out, total)[:] = result
        if a.write_next:
            rows_in = _view(a.unet_in, (2 if a.guided else 1) * a.rows * a.unet_row_stride).reshape(-1, a.unet_row_stride)
            sample = (np.float32(a.c_in_next) * result).reshape(a.rows, a.per_row)
            rows_in[: a.rows, : a.per_row] = sample
            if a.guided:
                rows_in[a.rows :, : a.per_row] = sample
            _view(a.timestep, (2 if a.guided else 1) * a.rows)[:] = a.timestep_next


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
def test_gpu_loop_host_side_matches_the_samplers(tiny_engine, monkeypatch, sampler, cfg):
    monkeypatch.setattr(gpu_loop, "DeviceBuffer", HostBuffer)
    request = GenerationRequest(prompt="an orange tram", steps=5, seed=4, sampler=sampler, cfg_scale=cfg)
    reference = Pipeline.load(tiny_engine, loop="numpy").generate(request)
    pipeline = Pipeline.load(tiny_engine)
    kernels = TranscribedKernels()
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
