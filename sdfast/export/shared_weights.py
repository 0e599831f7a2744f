"""One data file for several graphs: the per-size graphs of a component store each distinct weight once.

The graphs of one component at several image sizes hold the same weights (only shape constants, and which 3x3
convolutions the CPU variant rewrites as Winograd, differ). ``SharedWeightsWriter`` moves the external initializers of a set
of graphs into one data file, each distinct tensor (by its bytes, dtype and shape) once, at page-aligned offsets, and
points every graph's initializers there. It also makes the index the runtime maps that file by
(sdfast.runtime.backends.shared_weights): onnxruntime would copy external data into each session it builds, so the
runtime hands every session arrays over one memory map instead, and the weights are held once on disk and once in memory.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

ALIGN = 4096  # page-aligned: each tensor starts on a page of the map (and on any dtype boundary)


def _external(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _read(folder: Path, entry: dict[str, str], handles: dict) -> bytes:
    location = folder / entry["location"]  # graphs in several folders may name data files alike
    if location not in handles:
        handles[location] = open(location, "rb")
    handle = handles[location]
    handle.seek(int(entry.get("offset", 0)))
    if "length" in entry:
        return handle.read(int(entry["length"]))
    return handle.read()


class SharedWeightsWriter:
    """Builds one shared data file graph by graph, so an export holds one size's own data files at a time on disk.

    ``add`` rewrites a batch of (source, destination) graphs to keep their external initializers in the shared file,
    each distinct tensor (bytes, dtype, shape) once, then deletes the data files those sources used; ``close`` returns
    the index the runtime maps the file by. One tensor is in memory at a time (an SDXL U-Net's graphs hold 10 GB each).
    """

    def __init__(self, data_path: Path):
        self.data_path = data_path
        self.out = open(data_path, "wb")
        self.stored: dict[bytes, tuple[int, int]] = {}  # digest -> (offset, length)
        self.index: dict[str, list] = {}  # graph -> [[initializer, offset, length, dtype, shape], ...]
        self.tensors = self.saved_bytes = 0

    def add(self, graphs: list[tuple[Path, Path]]) -> None:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype

        old_files: set[Path] = set()
        handles: dict = {}
        models = []
        try:
            for source, destination in graphs:
                model = onnx.load(str(source), load_external_data=False)
                placed = self.index.setdefault(destination.name, [])
                for tensor in _all_initializers(model.graph):
                    if tensor.data_location != onnx.TensorProto.EXTERNAL:
                        continue
                    entry = _external(tensor)
                    old_files.add(source.parent / entry["location"])
                    data = _read(source.parent, entry, handles)
                    key = hashlib.sha1(f"{tensor.data_type}:{tuple(tensor.dims)}:".encode() + data, usedforsecurity=False).digest()
                    self.tensors += 1
                    if key in self.stored:
                        self.saved_bytes += len(data)
                    else:
                        self.out.write(b"\0" * (-self.out.tell() % ALIGN))
                        self.stored[key] = (self.out.tell(), len(data))
                        self.out.write(data)
                    _set_external(tensor, self.data_path.name, *self.stored[key])
                    placed.append([tensor.name, *self.stored[key], tensor_dtype_to_np_dtype(tensor.data_type).name, list(tensor.dims)])
                models.append((source, destination, model))
        finally:
            for handle in handles.values():
                handle.close()
        self.out.flush()
        for path in old_files - {self.data_path}:
            path.unlink(missing_ok=True)
        for source, destination, model in models:
            onnx.save(model, str(destination))  # the graph alone: every large tensor is external
            if source != destination:
                source.unlink()

    def close(self) -> dict:
        """{"file", "graphs": the index, "tensors", "stored", "saved_bytes"}."""
        self.out.close()
        return {"file": self.data_path.name, "graphs": self.index, "tensors": self.tensors, "stored": len(self.stored),
                "saved_bytes": self.saved_bytes}


def _all_initializers(graph):
    """The initializers of ``graph`` and of every subgraph (If/Loop bodies) in it."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_initializers(subgraph)


def share_between(staging: Path, name: str, entries: list[dict]) -> dict:
    """Put the weights of several components' graphs (the guided U-Net and the cond-only one) into ``{name}.weights``,
    each distinct tensor once, with its index; each entry's graphs are re-hashed and its ``shared_weights`` set, so the
    runtime maps one copy for all of them. Returns the writer's summary."""
    import json

    from sdfast.export.sized_export import INDEX_FORMAT
    from sdfast.export.staging import hashed

    data_path = staging / f"{name}.weights"
    writer = SharedWeightsWriter(data_path)
    targets = [target for entry in entries for target in (entry, *entry.get("variants", {}).values())]
    try:
        writer.add([(staging / target["file"],) * 2 for target in targets])
    finally:
        shared = writer.close()
    index_path = staging / f"{name}.weights.json"
    index_path.write_text(json.dumps({"format": INDEX_FORMAT, "file": shared["file"], "graphs": shared["graphs"]},
                                     separators=(",", ":")) + "\n")
    data_entry = hashed(staging, [data_path])
    for target in targets:
        target["files"] = {**hashed(staging, [staging / target["file"]]), **data_entry}
    record = {"file": data_path.name, "index": index_path.name, "files": {**data_entry, **hashed(staging, [index_path])},
              "tensors": shared["tensors"], "stored": shared["stored"], "saved_bytes": shared["saved_bytes"]}
    for entry in entries:  # a LoRA parameter map stays valid: the graphs keep their initializers' names
        entry["shared_weights"] = dict(record)
    return shared
