"""The GPU backends: their probes on any machine, and the cuda backend's device loop against the CPU image on a GPU.

The probes run everywhere with the CUDA runtime (and TensorRT) replaced by stand-ins that fail as real installs do.
The device test is marked gpu; skipped with the reason where onnxruntime-gpu, a CUDA device or the built kernels are missing.
"""
import sys
import types

import numpy as np
import pytest

from sdfast.cli.bench import backend_availability
from sdfast.errors import EngineError
from sdfast.runtime import cuda_device
from sdfast.runtime.backends import onnxruntime_cuda, tensorrt as trt_backend
from sdfast.runtime.backends import OrtBackend, get_backend
from sdfast.runtime.images import psnr
from sdfast.runtime.pipeline import GenerationRequest, Pipeline

INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: cuda-python 13 on a CUDA 12 driver


class StandInRuntime:
    """cuda.bindings.runtime's two calls a probe makes, answering as a broken or GPU-less machine does."""

    def __init__(self, count=0, error=0, raises=None):
        self.count, self.error, self.raises = count, error, raises

    def cudaGetDeviceCount(self):  # noqa: N802 - cuda-python's name
        if self.raises is not None:
            raise self.raises
        return (self.error, None if self.error else self.count)

    def cudaGetErrorString(self, error):  # noqa: N802
        return (0, b"CUDA driver version is insufficient for CUDA runtime version")


def _not_installed():
    raise EngineError("cuda-python is not installed (No module named 'cuda'); pip install 'sdfast[cuda]'")


PROBES = {  # how a machine answers -> what the reason must say
    "driver mismatch": (lambda: StandInRuntime(error=INSUFFICIENT_DRIVER), "driver version is insufficient"),
    "runtime raises": (lambda: StandInRuntime(raises=RuntimeError('Function "cuDriverGetVersion" not found')), "cuDriverGetVersion"),
    "no cuda-python": (_not_installed, "cuda-python is not installed"),
    "no device": (lambda: StandInRuntime(count=0), "no CUDA device is visible"),
}


@pytest.fixture
def tensorrt_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.99"))


@pytest.mark.parametrize("machine", PROBES)
@pytest.mark.parametrize("backend", ["tensorrt", "cuda"])
def test_every_failing_gpu_probe_skips_the_backend(monkeypatch, tensorrt_installed, backend, machine):
    """What sdfast bench asks before measuring: a failing probe is (False, why), never an exception."""
    runtime, reason = PROBES[machine]
    monkeypatch.setattr(cuda_device, "cudart", runtime)
    monkeypatch.setattr(OrtBackend, "available", lambda self: (True, ""))  # as if onnxruntime-gpu were installed
    ok, why = backend_availability(backend)
    assert not ok and reason in why and "\n" not in why


def test_a_tensorrt_that_cannot_load_skips_the_backend(monkeypatch, tmp_path):
    """tensorrt's import loads libnvinfer; when that fails with an OSError the backend is skipped with it."""
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    ok, why = get_backend("tensorrt").available()
    assert not ok and why == "TensorRT cannot be imported: OSError: libnvinfer.so.10: cannot open shared object file"


def test_onnxruntime_provider_probe_that_raises_skips_cuda(monkeypatch):
    import onnxruntime

    def broken():
        raise RuntimeError("CUDA failure 999: unknown error")

    monkeypatch.setattr(onnxruntime, "get_available_providers", broken)
    assert get_backend("cuda").available() == (False, "the probe failed: RuntimeError: CUDA failure 999: unknown error")


def test_a_visible_device_makes_the_backends_available(monkeypatch, tensorrt_installed):
    """The probe is not a blanket no: one device and the libraries present say yes."""
    monkeypatch.setattr(cuda_device, "cudart", lambda: StandInRuntime(count=1))
    monkeypatch.setattr(OrtBackend, "available", lambda self: (True, ""))
    assert trt_backend.TensorRTBackend().available() == (True, "")
    assert onnxruntime_cuda.OrtCudaBackend().available() == (True, "")


@pytest.fixture(scope="module")
def cuda_ready():
    ok, why = get_backend("cuda").available()
    if not ok:
        pytest.skip(why)
    from sdfast.runtime.native import load_kernels

    if load_kernels() is None:
        pytest.skip("the sdfast kernels are not built (cmake -S . -B build && cmake --build build)")


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_cuda_device_loop_matches_cpu(cuda_ready, tiny_fp16_engine, sampler):
    request = GenerationRequest(prompt="a lighthouse", steps=10, seed=3, sampler=sampler)
    gpu = Pipeline.load(tiny_fp16_engine, backend="cuda")
    result = gpu.generate(request)
    assert gpu.engines["unet"]._loop is not None and gpu.engines["unet"]._loop.last["evaluations"] == 10
    again = gpu.generate(request)  # the captured CUDA graph replays to the same image
    assert np.array_equal(result.images, again.images)
    cpu = Pipeline.load(tiny_fp16_engine, backend="cpu", loop="numpy").generate(request)
    assert psnr(result.images, cpu.images) > 30
