"""The CUDA kernels of the on-device loop (native/sdfast_kernels.h), loaded with ctypes: no torch, no build at import.

CMakeLists.txt builds ``libsdfast_kernels.so``. It is looked for in $SDFAST_NATIVE_LIB, next to this file, and in the
repository's ``build/``; without it ``load_kernels()`` returns None and the GPU backends run the update in numpy.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from sdfast.errors import EngineError

ABI_VERSION = 1
HISTORY = 4
LIBRARY_NAME = "libsdfast_kernels.so"

Coefficients = ctypes.c_float * HISTORY
Pointers = ctypes.c_void_p * HISTORY


class StepArgs(ctypes.Structure):
    """Mirror of SdfastStepArgs; the library's sdfast_step_args_size() must equal ctypes.sizeof(StepArgs)."""

    _fields_ = [
        ("unet_out", ctypes.c_void_p), ("unet_in", ctypes.c_void_p), ("timestep", ctypes.c_void_p),
        ("states", Pointers), ("estimates", Pointers), ("estimate_out", ctypes.c_void_p), ("state_out", ctypes.c_void_p),
        ("noise", ctypes.c_void_p),
        ("state_coeffs", Coefficients), ("estimate_coeffs", Coefficients), ("noise_coeff", ctypes.c_float),
        ("c_skip", ctypes.c_float), ("c_out", ctypes.c_float), ("c_in_next", ctypes.c_float), ("timestep_next", ctypes.c_float),
        ("cfg_scale", ctypes.c_float),
        ("per_row", ctypes.c_int64), ("rows", ctypes.c_int64), ("unet_row_stride", ctypes.c_int64),
        ("guided", ctypes.c_int32), ("use_cfg", ctypes.c_int32), ("write_next", ctypes.c_int32), ("reserved", ctypes.c_int32),
    ]


def library_candidates() -> list[Path]:
    here = Path(__file__).resolve()
    candidates = [here.with_name(LIBRARY_NAME), here.parents[2] / "build" / LIBRARY_NAME]
    if os.environ.get("SDFAST_NATIVE_LIB"):
        candidates.insert(0, Path(os.environ["SDFAST_NATIVE_LIB"]))
    return candidates


class Kernels:
    """The loaded library; each call raises EngineError with the CUDA runtime's message when it fails."""

    def __init__(self, path: Path):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as error:
            raise EngineError(f"cannot load the sdfast kernels from {path}: {error}") from None
        lib.sdfast_abi_version.restype = ctypes.c_int
        lib.sdfast_step_args_size.restype = ctypes.c_size_t
        lib.sdfast_sampler_step.argtypes = [ctypes.POINTER(StepArgs), ctypes.c_void_p]
        lib.sdfast_scale.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p]
        lib.sdfast_to_uint8.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.sdfast_error_string.argtypes = [ctypes.c_int]
        lib.sdfast_error_string.restype = ctypes.c_char_p
        if lib.sdfast_abi_version() != ABI_VERSION or lib.sdfast_step_args_size() != ctypes.sizeof(StepArgs):
            raise EngineError(
                f"{path} is ABI {lib.sdfast_abi_version()} with a {lib.sdfast_step_args_size()}-byte step struct; this sdfast "
                f"needs ABI {ABI_VERSION}, {ctypes.sizeof(StepArgs)} bytes (rebuild it with CMake)"
            )
        self.path = path
        self._lib = lib

    def _check(self, name: str, code: int) -> None:
        if code:
            raise EngineError(f"CUDA kernel {name} failed: {self._lib.sdfast_error_string(code).decode()} (error {code})")

    def sampler_step(self, args: StepArgs, stream: int) -> None:
        self._check("sampler_step", self._lib.sdfast_sampler_step(ctypes.byref(args), ctypes.c_void_p(stream)))

    def scale(self, x: int, y: int, factor: float, count: int, stream: int) -> None:
        self._check("scale", self._lib.sdfast_scale(x, y, factor, count, ctypes.c_void_p(stream)))

    def to_uint8(self, image: int, out: int, batch: int, height: int, width: int, stream: int) -> None:
        self._check("to_uint8", self._lib.sdfast_to_uint8(image, out, batch, height, width, ctypes.c_void_p(stream)))


@functools.cache
def load_kernels() -> Kernels | None:
    """The first library found, or None; a library that is found but broken is an error, not a silent fallback."""
    for path in library_candidates():
        if path.is_file():
            return Kernels(path)
    return None
