"""The native kernels: CMake builds them wherever nvcc is (CI included), the ctypes mirror matches the C ABI, and the
sampler kernel's arithmetic (native/sdfast_step.h), compiled for the host by nvcc, equals device_loop.fused_step.

The CUDA library is compiled and checked here, not run: launching needs a GPU, and without one each call reports the
CUDA error cleanly. The arithmetic runs on the CPU through native/sdfast_host_step.cu (tests/host_kernels.py).
"""
import ctypes
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from sdfast.errors import EngineError
from sdfast.export.builtin import SD15_SCHEDULER_CONFIG
from sdfast.runtime import native
from sdfast.runtime.device_loop import StepScalars, fused_step, guide
from sdfast.sampling.registry import SAMPLERS
from sdfast.sampling.schedules import NoiseSchedule
from sdfast.sampling.tables import sampler_table
from tests.host_kernels import host_step  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]
needs_toolchain = pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("nvcc")), reason="needs cmake and nvcc")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("native-build")
    configure = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DSDFAST_BUILD_TESTS=OFF", "-DSDFAST_CUDA_ARCHITECTURES=80"],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stderr[-2000:]
    compiled = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-2000:]
    return build


@needs_toolchain
def test_cmake_builds_the_kernels_and_the_abi_check_links(built):
    library = built / native.LIBRARY_NAME
    assert library.is_file()
    check = subprocess.run([str(built / "sdfast_abi_check")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{ctypes.sizeof(native.StepArgs)} bytes (library says {ctypes.sizeof(native.StepArgs)})" in check.stdout


@needs_toolchain
def test_ctypes_loads_the_library_and_checks_its_abi(built):
    kernels = native.Kernels(built / native.LIBRARY_NAME)
    assert kernels._lib.sdfast_abi_version() == native.ABI_VERSION
    assert kernels._lib.sdfast_step_args_size() == ctypes.sizeof(native.StepArgs)
    # the struct's layout, field by field, against the C offsets the compiler chose (alignment of the int64 block)
    assert native.StepArgs.per_row.offset % 8 == 0 and native.StepArgs.guided.offset == native.StepArgs.unet_row_stride.offset + 8


@needs_toolchain
def test_launch_without_a_gpu_reports_the_cuda_error(built):
    """No GPU here: a launch must come back as a one-line EngineError from the CUDA runtime, never a crash."""
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is present; the gpu-marked tests run the kernels")
    kernels = native.Kernels(built / native.LIBRARY_NAME)
    host = np.zeros(16, np.float32)
    with pytest.raises(EngineError, match=r"CUDA kernel scale failed: .+ \(error \d+\)"):
        kernels.scale(host.ctypes.data, host.ctypes.data, 2.0, 16, 0)


def test_a_broken_library_is_refused(tmp_path):
    """A file that is not the library is refused with the reason, not used."""
    bogus = tmp_path / native.LIBRARY_NAME
    bogus.write_bytes(b"not a shared object")
    with pytest.raises(EngineError, match="cannot load the sdfast kernels"):
        native.Kernels(bogus)


def test_package_works_without_the_library(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "library_candidates", lambda: [tmp_path / "missing.so"])
    native.load_kernels.cache_clear()
    try:
        assert native.load_kernels() is None
    finally:
        native.load_kernels.cache_clear()


TABULATED = [key for key, spec in SAMPLERS.items() if not spec.seeded_tree]
GUIDANCE = {"cfg": (True, True), "guided batch, cfg 1": (True, False), "unguided": (False, False)}  # (guided, use_cfg)


def _pointer(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


@pytest.mark.parametrize("guidance", GUIDANCE)
@pytest.mark.parametrize("sampler", TABULATED)
def test_kernel_arithmetic_on_the_host_equals_fused_step(host_step, sampler, guidance):
    """Every evaluation of every sampler table (history, noise draws, the last step's write_next = 0), with and without cfg."""
    guided, use_cfg = GUIDANCE[guidance]
    spec, schedule = SAMPLERS[sampler], NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)
    table = sampler_table(spec, spec.plan(SD15_SCHEDULER_CONFIG, schedule, 5), SD15_SCHEDULER_CONFIG, "epsilon", schedule)
    assert table is not None, sampler
    rng = np.random.default_rng(zlib.crc32(f"{sampler}/{guidance}".encode()))  # str hash() changes every run
    rows, shape, in_channels = 2, (2, 4, 3, 5), 5  # a U-Net input wider than the latents: only its first 4 channels are written
    unet_rows = rows * (2 if guided else 1)
    noise = rng.standard_normal((max(table.noise_draws, 1), *shape)).astype(np.float32)  # [draws, B, C, h, w]
    for j in range(table.evaluations):
        scalars = StepScalars.of(table, j)
        unet_out = rng.standard_normal((unet_rows, *shape[1:])).astype(np.float32)  # [R, C, h, w]
        # a slot whose coefficient is 0 holds NaN: the kernel must not read it (nor estimates[0], D_j's own slot)
        states = [rng.standard_normal(shape).astype(np.float32) if k == 0 or scalars.state_coeffs[k] else np.full(shape, np.nan, np.float32)
                  for k in range(native.HISTORY)]
        estimates = [np.full(shape, np.nan, np.float32)] + [
            rng.standard_normal(shape).astype(np.float32) if scalars.estimate_coeffs[k] else np.full(shape, np.nan, np.float32)
            for k in range(1, native.HISTORY)]
        unet_in = np.full((unet_rows, in_channels, *shape[2:]), -7.0, np.float32)
        timestep = np.full((unet_rows,), -7.0, np.float32)
        estimate_out, state_out = np.empty(shape, np.float32), np.empty(shape, np.float32)
        draw = noise[scalars.draw] if scalars.draw >= 0 else None
        args = native.StepArgs(
            unet_out=_pointer(unet_out), unet_in=_pointer(unet_in), timestep=_pointer(timestep),
            states=native.Pointers(*map(_pointer, states)), estimates=native.Pointers(*map(_pointer, estimates)),
            estimate_out=_pointer(estimate_out), state_out=_pointer(state_out), noise=_pointer(draw),
            state_coeffs=native.Coefficients(*scalars.state_coeffs), estimate_coeffs=native.Coefficients(*scalars.estimate_coeffs),
            noise_coeff=scalars.noise_coeff, c_skip=scalars.c_skip, c_out=scalars.c_out, c_in_next=scalars.c_in_next,
            timestep_next=scalars.timestep_next, cfg_scale=7.5, per_row=int(np.prod(shape[1:])), rows=rows,
            unet_row_stride=int(np.prod(unet_in.shape[1:])), guided=int(guided), use_cfg=int(use_cfg), write_next=int(scalars.write_next),
        )
        assert host_step.sampler_step(args) == 0

        denoised, state = fused_step(scalars, guide(unet_out, rows, guided, use_cfg, 7.5), states, estimates, noise)
        scale = float(np.abs(state).max()) + float(np.abs(denoised).max())
        np.testing.assert_allclose(estimate_out, denoised, rtol=1e-6, atol=1e-6 * scale, err_msg=f"D_{j}")
        np.testing.assert_allclose(state_out, state, rtol=1e-6, atol=1e-6 * scale, err_msg=f"S_{j + 1}")
        if scalars.write_next:
            for half in range(unet_rows // rows):
                np.testing.assert_allclose(unet_in[half * rows:(half + 1) * rows, :4], np.float32(scalars.c_in_next) * state,
                                           rtol=1e-6, atol=1e-6 * scale)
            assert np.array_equal(timestep, np.full(unet_rows, np.float32(scalars.timestep_next)))
        else:  # the last evaluation leaves the U-Net's input alone
            assert (unet_in[:, :4] == -7.0).all() and (timestep == -7.0).all()
        assert (unet_in[:, 4:] == -7.0).all(), "wrote past the latent channels of the U-Net input"


def test_host_build_refuses_missing_buffers(host_step):
    """The argument check the CUDA entry point shares: a step without its output buffers is refused, not run."""
    assert host_step.sampler_step(native.StepArgs(per_row=4, rows=1)) == 1  # cudaErrorInvalidValue, as sdfast_sampler_step
