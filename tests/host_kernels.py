"""The sampler kernel's own arithmetic (native/sdfast_step.h) built for the CPU with nvcc, loaded with ctypes.

native/sdfast_host_step.cu runs the kernel's per-element function in a loop; nvcc compiles it for the host only, so the
tests run the code the GPU runs, on a machine without one. Skipped with the reason where nvcc is missing.
"""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from sdfast.runtime.native import StepArgs

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "native" / "sdfast_host_step.cu"
NVCC = shutil.which("nvcc")


class HostStep:
    """libsdfast_host_step.so: ``sampler_step(args)`` runs sdfast_sampler_step's arithmetic on host pointers."""

    def __init__(self, path: Path):
        self._lib = ctypes.CDLL(str(path))
        self._lib.sdfast_host_sampler_step.argtypes = [ctypes.POINTER(StepArgs)]
        self._lib.sdfast_host_sampler_step.restype = ctypes.c_int
        self._lib.sdfast_host_step_args_size.restype = ctypes.c_size_t
        assert self._lib.sdfast_host_step_args_size() == ctypes.sizeof(StepArgs), "the ctypes StepArgs does not match the header"

    def sampler_step(self, args: StepArgs) -> int:
        return self._lib.sdfast_host_sampler_step(ctypes.byref(args))


def build_host_step(directory: Path) -> HostStep:
    """Compile native/sdfast_host_step.cu into ``directory`` (once per directory) and load it."""
    library = directory / "libsdfast_host_step.so"
    if not library.is_file():
        command = [NVCC, "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-cudart", "static",
                   "-I", str(REPO / "native"), "-o", str(library), str(SOURCE)]
        compiled = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert compiled.returncode == 0, " ".join(command) + "\n" + compiled.stdout[-3000:] + compiled.stderr[-3000:]
    return HostStep(library)


@pytest.fixture(scope="session")
def host_step(tmp_path_factory) -> HostStep:
    if NVCC is None:
        pytest.skip("needs nvcc, which compiles the kernel's arithmetic for the host")
    directory = tmp_path_factory.getbasetemp() / "host-step"
    directory.mkdir(exist_ok=True)
    return build_host_step(directory)
