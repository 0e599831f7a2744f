"""Execution backends, one module each behind one interface (base.py): onnxruntime on the CPU, onnxruntime's CUDA
provider, TensorRT. The GPU ones are imported on first use, so their libraries (cuda-python, tensorrt) stay optional."""
from __future__ import annotations

import importlib

from sdfast.errors import EngineError
from sdfast.runtime.backends.base import Backend, Engine
from sdfast.runtime.backends.onnxruntime_cpu import OrtBackend, OrtEngine, cpu_isa

BACKENDS: dict[str, Backend] = {"cpu": OrtBackend("cpu", "CPUExecutionProvider")}
# backend name -> (module, class) of the GPU backends, made on first use
_GPU_BACKENDS = {"cuda": ("sdfast.runtime.backends.onnxruntime_cuda", "OrtCudaBackend"),
                 "tensorrt": ("sdfast.runtime.backends.tensorrt", "TensorRTBackend")}
BACKEND_NAMES = ("cpu", *_GPU_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in BACKENDS and name in _GPU_BACKENDS:
        module, cls = _GPU_BACKENDS[name]
        BACKENDS[name] = getattr(importlib.import_module(module), cls)()
    backend = BACKENDS.get(name)
    if backend is None:
        raise EngineError(f"unknown backend '{name}'; choose one of {', '.join(BACKEND_NAMES)}")
    return backend


__all__ = ["BACKENDS", "BACKEND_NAMES", "Backend", "Engine", "OrtBackend", "OrtEngine", "cpu_isa", "get_backend"]
