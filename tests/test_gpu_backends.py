"""The cuda backend on a GPU: the device loop (IO binding, CUDA graphs, the sampler kernel) against the CPU image.

Marked gpu; skipped with the reason where onnxruntime-gpu, a CUDA device or the built kernels are missing.
"""
import numpy as np
import pytest

from sdfast.runtime.backends import get_backend
from sdfast.runtime.images import psnr
from sdfast.runtime.pipeline import GenerationRequest, Pipeline

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_ready():
    ok, why = get_backend("cuda").available()
    if not ok:
        pytest.skip(why)
    from sdfast.runtime.native import load_kernels

    if load_kernels() is None:
        pytest.skip("the sdfast kernels are not built (cmake -S . -B build && cmake --build build)")


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
