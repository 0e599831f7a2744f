"""CUDA streams, device buffers and graphs from cuda-python (cuda.bindings.runtime), for the GPU backends. Not torch.

Every call's error code is checked and turned into a one-line EngineError.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from sdfast.errors import EngineError


@functools.cache
def cudart():
    """cuda-python's runtime bindings (cuda-python >= 12.6 names them cuda.bindings.runtime; older ones cuda.cudart)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as error:
            raise EngineError(f"cuda-python is not installed ({error}); pip install 'sdfast[cuda]'") from None
    return runtime


def check(result, what: str):
    """cuda-python returns (error, value...): the value(s), or an EngineError naming the call."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        name = cudart().cudaGetErrorString(error)[1]
        raise EngineError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name} (CUDA error {int(error)})")
    return values[0] if len(values) == 1 else tuple(values) if values else None


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "9.0"
    memory_bytes: int


def device_info(device: int = 0) -> DeviceInfo:
    props = check(cudart().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.strip("\x00 "), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def upload_to(pointer: int, array: np.ndarray, stream: "Stream") -> None:
    """Host -> device memory someone else owns (an onnxruntime OrtValue), on ``stream``, then waits.

    Not OrtValue.update_inplace: that copies on the legacy default stream, which a non-blocking stream does not order with.
    """
    array = np.ascontiguousarray(array)
    rt = cudart()
    check(rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle),
          "cudaMemcpyAsync to the device")
    stream.synchronize()


def download_from(pointer: int, shape: tuple[int, ...], dtype, stream: "Stream") -> np.ndarray:
    """Device memory someone else owns -> host, on ``stream``, then waits."""
    out = np.empty(shape, dtype)
    rt = cudart()
    check(rt.cudaMemcpyAsync(out.ctypes.data, pointer, out.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
          "cudaMemcpyAsync to the host")
    stream.synchronize()
    return out


class Stream:
    """A non-blocking stream: the GPU backends queue the U-Net and the sampler kernel on it, in order, with no syncs."""

    def __init__(self):
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def pointer(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            cudart().cudaStreamDestroy(self.handle)
            self.handle = None


class Event:
    """A CUDA event: recorded on a stream after some work, it says when that work has run, and how long it took."""

    def __init__(self):
        self.handle = check(cudart().cudaEventCreate(), "cudaEventCreate")  # with timing, for seconds_since

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def query(self) -> bool:
        """Whether the work before the event's record has run (never waits)."""
        rt = cudart()
        result = rt.cudaEventQuery(self.handle)
        if int(result[0] if isinstance(result, tuple) else result) == int(rt.cudaError_t.cudaErrorNotReady):
            return False
        check(result, "cudaEventQuery")
        return True

    def synchronize(self) -> None:
        """Waits until the work before the event's record has run."""
        check(cudart().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def seconds_since(self, earlier: "Event") -> float:
        """Device time between two completed events."""
        return float(check(cudart().cudaEventElapsedTime(earlier.handle, self.handle), "cudaEventElapsedTime")) / 1000.0

    def close(self) -> None:
        if self.handle is not None:
            cudart().cudaEventDestroy(self.handle)
            self.handle = None


class DeviceBuffer:
    """One device allocation with a numpy shape and dtype, made once and reused for every step."""

    def __init__(self, shape: tuple[int, ...], dtype=np.float32):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.pointer = int(check(cudart().cudaMalloc(max(self.nbytes, 1)), "cudaMalloc"))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        """Host -> device into the buffer's start, queued on ``stream``, then waits (the host array may go away)."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.nbytes > self.nbytes:
            raise EngineError(f"upload of {array.shape} into a buffer of {self.shape}")
        upload_to(self.pointer, array, stream)

    def download(self, stream: Stream, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Device -> host (the first ``shape`` elements; default all); waits for the stream."""
        return download_from(self.pointer, self.shape if shape is None else tuple(shape), self.dtype, stream)

    def zero(self, stream: Stream) -> None:
        check(cudart().cudaMemsetAsync(self.pointer, 0, self.nbytes, stream.handle), "cudaMemsetAsync")

    def free(self) -> None:
        if self.pointer:
            cudart().cudaFree(self.pointer)
            self.pointer = 0


class CudaGraph:
    """A captured sequence of launches on a stream, replayed with one call (TensorRT's U-Net at a fixed shape)."""

    def __init__(self, stream: Stream, launch):
        rt = cudart()
        check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")
        try:
            launch()
        except BaseException:
            error, graph = rt.cudaStreamEndCapture(stream.handle)  # end the capture; the launch's error is the one to report
            if int(error) == 0 and graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        self.graph = graph
        self.executable = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def replay(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.executable, stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        rt = cudart()
        rt.cudaGraphExecDestroy(self.executable)
        rt.cudaGraphDestroy(self.graph)
