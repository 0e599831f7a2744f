"""A .safetensors file's tensors as float32 numpy arrays, bfloat16 included.

safetensors' own numpy loader cannot return bfloat16 (numpy has no such dtype), and many LoRAs are saved in it; the
format is one little-endian u64 header length, a JSON header (dtype, shape, byte range per tensor), then the bytes
(https://github.com/huggingface/safetensors#format), so it is read here directly, every range checked.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from sdfast.errors import RequestError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def read_header(path: Path, data: bytes | None = None) -> tuple[int, dict]:
    """(the JSON header's length, the header) of a safetensors file, from ``data`` or from the file's first bytes; a
    RequestError naming the file when it has no readable header."""
    if data is None:
        with open(path, "rb") as handle:
            data = handle.read(8)
            if len(data) == 8:
                data += handle.read(min(struct.unpack("<Q", data)[0], MAX_HEADER_BYTES))
    if len(data) < 8:
        raise RequestError(f"LoRA file '{path.name}' is not a safetensors file (too short)")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > min(MAX_HEADER_BYTES, len(data) - 8):
        raise RequestError(f"LoRA file '{path.name}' is not a safetensors file (corrupt header length)")
    try:
        header = json.loads(data[8:8 + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError(f"LoRA file '{path.name}' is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise RequestError(f"LoRA file '{path.name}' is not a safetensors file (its header is not a JSON object)")
    return header_length, header


def read_tensors(path: Path, max_bytes: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> float32 array, the header's __metadata__); a RequestError naming the file when it is not a readable
    safetensors file of float tensors, or is larger than ``max_bytes``."""
    size = path.stat().st_size
    if size > max_bytes:
        raise RequestError(f"LoRA file '{path.name}' is {size / 2**20:.3g} MiB, over the {max_bytes / 2**20:.3g} MiB limit")
    data = path.read_bytes()
    header_length, header = read_header(path, data)
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + header_length:]
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            if not all(type(n) is int and n >= 0 for n in [*shape, begin, end]):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise RequestError(f"LoRA file '{path.name}' is corrupt: tensor '{name}' has no valid dtype, shape or data_offsets") from None
        if dtype not in _DTYPES:
            raise RequestError(f"LoRA file '{path.name}': tensor '{name}' is {dtype}; LoRA weights must be F32, F16 or BF16")
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= begin <= end <= len(body)) or end - begin != count * np.dtype(_DTYPES[dtype]).itemsize:
            raise RequestError(f"LoRA file '{path.name}' is corrupt: tensor '{name}' does not fit its byte range (truncated file?)")
        raw = np.frombuffer(body[begin:end], dtype=_DTYPES[dtype]).reshape(shape)
        tensors[name] = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32)
    return tensors, {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
