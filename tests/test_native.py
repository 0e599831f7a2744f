"""The native kernels: CMake builds them wherever nvcc is (CI included), and the ctypes mirror matches the C ABI.

Compiled and checked here, not run: launching needs a GPU, and without one each call reports the CUDA error cleanly.
"""
import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sdfast.errors import EngineError
from sdfast.runtime import native

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
