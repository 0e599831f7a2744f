"""The weights of a component's per-size graphs, mapped once and handed to every session that names them.

An engine dir with several image sizes keeps each component's weights in one data file (sdfast.export.shared_weights)
with an index: for each graph, [initializer, offset, length, dtype, shape]. onnxruntime copies external data into each
session it builds, so five sizes would hold five copies; given arrays instead (SessionOptions.add_initializer), it
uses their memory as is. Here every session of the file gets arrays over one read-only memory map: the pages are the
kernel's page cache, held once however many sessions use them. Prepacking stays off for such sessions (a packed copy
of each MatMul weight would be per session): measured in benchmarks/results/README.md.
"""
from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path

import numpy as np

from sdfast.errors import EngineError
from sdfast.runtime.manifest import ComponentInfo, confined

_lock = threading.Lock()
_mappings: "weakref.WeakValueDictionary[tuple, _Mapping]" = weakref.WeakValueDictionary()  # unmapped with its last engine
_indexes: dict[tuple, dict] = {}


class _Mapping:
    """One read-only map of a data file, shared while some engine holds it (sessions given arrays over it hold it)."""

    def __init__(self, path: Path):
        self.array = np.memmap(path, dtype=np.uint8, mode="r")


def _mapping(path: Path) -> _Mapping:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        found = _mappings.get(key)
        if found is None:
            found = _mappings[key] = _Mapping(path)
        return found


def _index(root: Path, entry: dict) -> dict:
    path = confined(root, entry["index"])
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key not in _indexes:
            try:
                _indexes[key] = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise EngineError(f"{path}: the shared-weights index is unreadable ({error})") from None
        return _indexes[key]


def shared_arrays(info: ComponentInfo, graph: Path, skip: set[str] = frozenset()) -> tuple[object, dict[str, np.ndarray]]:
    """(the map, initializer -> a read-only array over it) for every external initializer of ``graph`` (one of the
    component's graphs) not in ``skip``; (None, {}) when the component keeps no shared weights. Whoever keeps the
    arrays keeps the map: while one is held, every other session of the file gets arrays over the same map."""
    entry = info.shared_weights
    if not entry:
        return None, {}
    root = graph.parent
    try:
        placed = _index(root, entry)["graphs"][graph.name]
        mapped = _mapping(confined(root, entry["file"]))
        arrays = {}
        size = len(mapped.array)
        for name, offset, length, dtype, shape in placed:
            if name in skip:
                continue
            kind = np.dtype(dtype)
            if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset and offset + length <= size
                    and offset % kind.alignment == 0 and length == kind.itemsize * int(np.prod(shape, dtype=np.int64))):
                raise ValueError(f"initializer '{name}' is placed outside the file or does not fit its shape")
            arrays[name] = mapped.array[offset:offset + length].view(kind).reshape(shape)
        return mapped, arrays
    except (KeyError, TypeError, ValueError, OSError) as error:
        raise EngineError(f"{info.name}: the shared weights of '{graph.name}' cannot be mapped ({type(error).__name__}: {error})") from None
