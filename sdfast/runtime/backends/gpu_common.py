"""What the GPU backends share: the device count, a probe that reports instead of raising, one stream per backend."""
from __future__ import annotations

import logging
from typing import Callable

from sdfast.errors import EngineError

log = logging.getLogger("sdfast.gpu")
Progress = Callable[[str], None]


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or ['no message'])[0]}"


def _gpu_count() -> int:
    """CUDA devices visible to cuda-python; an EngineError with the reason for every way it cannot tell."""
    from sdfast.runtime.cuda_device import check, cudart

    try:
        return int(check(cudart().cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except EngineError as error:
        if "insufficient" in str(error).lower():  # cuda-python 13 needs driver 580+; CUDA 12 drivers need cuda-python 12
            raise EngineError(f"{error}; with a CUDA 12 driver, pip install 'cuda-python>=12.6,<13'") from None
        raise
    except Exception as error:  # noqa: BLE001 - a broken driver or cuda-python install raises its own kinds
        raise EngineError(f"cannot query the CUDA devices: {_first_line(error)}") from None


def _probe(check: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    """``check()``, or (False, the reason) for any error it raises: a GPU probe skips its backend, never aborts (bench)."""
    try:
        return check()
    except EngineError as error:
        return False, str(error)
    except Exception as error:  # noqa: BLE001 - onnxruntime, TensorRT and the driver each raise their own kinds
        return False, f"the probe failed: {_first_line(error)}"


class _SharedStream:
    """One CUDA stream per backend, made on first use: every engine's work queues on it in order."""

    def __init__(self):
        self._stream = None

    def get(self):
        from sdfast.runtime.cuda_device import Stream

        if self._stream is None:
            self._stream = Stream()
        return self._stream
