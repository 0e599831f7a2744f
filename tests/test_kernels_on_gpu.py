"""The CUDA kernels launched on a real GPU, on device buffers, against the numpy code they replace.

These need a GPU, cuda-python and nvcc (or a built library): the GPU check runs them (benchmarks/gpu/check.py). The
same arithmetic is checked on the CPU by test_native.py through the host build of native/sdfast_step.h.
"""
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from sdfast.export.builtin import SD15_SCHEDULER_CONFIG
from sdfast.runtime import native
from sdfast.runtime.device_loop import StepScalars, fused_step, guide
from sdfast.runtime.images import to_uint8
from sdfast.sampling.registry import SAMPLERS
from sdfast.sampling.schedules import NoiseSchedule
from sdfast.sampling.tables import sampler_table

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    """(kernels, stream) on device 0: the built library (SDFAST_NATIVE_LIB or beside the package), else built here."""
    try:
        from sdfast.runtime import cuda_device

        count = cuda_device.check(cuda_device.cudart().cudaGetDeviceCount(), "cudaGetDeviceCount")
    except Exception as error:  # noqa: BLE001 - no cuda-python, no driver, no device: all mean "no GPU here"
        pytest.skip(f"no CUDA device: {error}")
    if not count:
        pytest.skip("no CUDA device")
    kernels = native.load_kernels()
    if kernels is None:
        capability = cuda_device.device_info().compute_capability.replace(".", "")
        build = tmp_path_factory.mktemp("kernels")
        for command in (["cmake", "-S", str(REPO), "-B", str(build), f"-DSDFAST_CUDA_ARCHITECTURES={capability}", "-DSDFAST_BUILD_TESTS=OFF"],
                        ["cmake", "--build", str(build)]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if done.returncode:
                pytest.skip(f"the kernels did not build: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        kernels = native.Kernels(build / native.LIBRARY_NAME)
    stream = cuda_device.Stream()
    yield kernels, stream, cuda_device
    stream.close()


def on_device(cuda_device, stream, array: np.ndarray | None, buffers: list):
    """A device buffer holding a copy of ``array``, listed in ``buffers`` to be freed; 0 for None."""
    if array is None:
        return 0
    buffer = cuda_device.DeviceBuffer(array.shape, array.dtype)
    buffer.upload(array, stream)
    buffers.append(buffer)
    return buffer


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "dpmpp_2m_sde", "heun", "ddim"])
@pytest.mark.parametrize("guided,use_cfg", [(True, True), (False, False)])
def test_sampler_kernel_on_the_gpu_equals_fused_step(gpu, sampler, guided, use_cfg):
    kernels, stream, cuda_device = gpu
    spec, schedule = SAMPLERS[sampler], NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)
    table = sampler_table(spec, spec.plan(SD15_SCHEDULER_CONFIG, schedule, 4), SD15_SCHEDULER_CONFIG, "epsilon", schedule)
    rng = np.random.default_rng(zlib.crc32(f"gpu/{sampler}/{guided}".encode()))
    rows, shape = 2, (2, 4, 16, 24)  # [B, C, h, w]: more elements than one block, so the grid-stride loop runs
    unet_rows = rows * (2 if guided else 1)
    noise = rng.standard_normal((max(table.noise_draws, 1), *shape)).astype(np.float32)  # [draws, B, C, h, w]
    for j in range(table.evaluations):
        scalars = StepScalars.of(table, j)
        unet_out = rng.standard_normal((unet_rows, *shape[1:])).astype(np.float32)
        states = [rng.standard_normal(shape).astype(np.float32) for _ in range(native.HISTORY)]
        estimates = [rng.standard_normal(shape).astype(np.float32) for _ in range(native.HISTORY)]
        draw = noise[scalars.draw] if scalars.draw >= 0 else None
        buffers: list = []
        put = lambda a: on_device(cuda_device, stream, a, buffers)  # noqa: E731
        try:
            unet_in, timestep = put(np.zeros((unet_rows, *shape[1:]), np.float32)), put(np.zeros(unet_rows, np.float32))
            estimate_out, state_out = put(np.zeros(shape, np.float32)), put(np.zeros(shape, np.float32))
            state_buffers, estimate_buffers = [put(s) for s in states], [put(e) for e in estimates]
            noise_buffer = put(draw)
            args = native.StepArgs(
                unet_out=put(unet_out).pointer, unet_in=unet_in.pointer, timestep=timestep.pointer,
                states=native.Pointers(*(b.pointer for b in state_buffers)), estimates=native.Pointers(*(b.pointer for b in estimate_buffers)),
                estimate_out=estimate_out.pointer, state_out=state_out.pointer, noise=noise_buffer.pointer if noise_buffer else None,
                state_coeffs=native.Coefficients(*scalars.state_coeffs), estimate_coeffs=native.Coefficients(*scalars.estimate_coeffs),
                noise_coeff=scalars.noise_coeff, c_skip=scalars.c_skip, c_out=scalars.c_out, c_in_next=scalars.c_in_next,
                timestep_next=scalars.timestep_next, cfg_scale=7.5, per_row=int(np.prod(shape[1:])), rows=rows,
                unet_row_stride=int(np.prod(shape[1:])), guided=int(guided), use_cfg=int(use_cfg), write_next=int(scalars.write_next))
            kernels.sampler_step(args, stream.pointer)
            stream.synchronize()
            denoised, state = fused_step(scalars, guide(unet_out, rows, guided, use_cfg, 7.5), states, estimates, noise)
            scale = float(np.abs(state).max()) + float(np.abs(denoised).max())
            np.testing.assert_allclose(estimate_out.download(stream), denoised, rtol=1e-5, atol=1e-5 * scale, err_msg=f"D_{j}")
            np.testing.assert_allclose(state_out.download(stream), state, rtol=1e-5, atol=1e-5 * scale, err_msg=f"S_{j + 1}")
            if scalars.write_next:
                np.testing.assert_allclose(unet_in.download(stream)[:rows], np.float32(scalars.c_in_next) * state, rtol=1e-5, atol=1e-5 * scale)
                assert np.array_equal(timestep.download(stream), np.full(unet_rows, np.float32(scalars.timestep_next)))
        finally:
            for buffer in buffers:
                buffer.free()


def test_scale_and_uint8_kernels_on_the_gpu(gpu):
    kernels, stream, cuda_device = gpu
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((1, 4, 64, 64)).astype(np.float32)
    image = (rng.standard_normal((2, 3, 40, 56)) * 0.8).astype(np.float32)  # some values outside [-1, 1]: clipped
    image.flat[:4] = [0.5 / 255 * 2 - 1, -1.0, 1.0, 2.5]  # a half-way value: rounds to even, as np.round
    buffers: list = []
    x, y = on_device(cuda_device, stream, latents, buffers), on_device(cuda_device, stream, np.zeros_like(latents), buffers)
    kernels.scale(x.pointer, y.pointer, 1 / 0.18215, latents.size, stream.pointer)
    stream.synchronize()
    np.testing.assert_allclose(y.download(stream), latents * np.float32(1 / 0.18215), rtol=1e-6)
    source, out = on_device(cuda_device, stream, image, buffers), cuda_device.DeviceBuffer((2, 40, 56, 3), np.uint8)
    buffers.append(out)
    kernels.to_uint8(source.pointer, out.pointer, 2, 40, 56, stream.pointer)
    stream.synchronize()
    assert np.array_equal(out.download(stream), to_uint8(image))
    for buffer in buffers:
        buffer.free()
