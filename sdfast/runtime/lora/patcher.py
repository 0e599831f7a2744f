"""A LoRA's deltas merged into an engine's stored weights, as initializer overrides for a new session.

For each patched weight the parameter map (written at export, sdfast.export.parameter_map) says which initializer of
the loaded graph holds it, in which layout, and where its bytes are in the graph's data file. The merged initializer
is stored + layout(sum of multiplier x delta): every layout is linear, so this equals exporting the merged weight.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdfast.errors import EngineError
from sdfast.runtime.lora.weight_layouts import apply_layout, winograd_f2x2_3x3


def read_parameter_map(manifest, component: str) -> dict:
    """The component's parameter map (its file checked against the manifest's sha256), or an EngineError."""
    info = manifest.components[component]
    if not info.parameter_map:
        raise EngineError(f"engine dir {manifest.root}: {component} has no LoRA parameter map (exported before sdfast "
                          "applied LoRAs at run time): re-export it to use LoRAs")
    manifest.verify_files(full=True, files=info.parameter_map["files"])
    try:
        data = json.loads(manifest.path(info.parameter_map["file"]).read_text())
        data["parameters"] = {name: tuple(shape) for name, shape in data["parameters"].items()}
        return data
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise EngineError(f"engine dir {manifest.root}: {component}'s parameter map is unreadable ({error})") from None


def updates_for(component: str, uses) -> dict[str, list[tuple[object, float]]]:
    """target weight -> [(update, multiplier), ...] of ``component`` (``uses``: (LoraFile, multiplier) pairs)."""
    found: dict[str, list[tuple[object, float]]] = {}
    for lora, multiplier in uses:
        if multiplier == 0:
            continue
        for target, update in lora.updates.items():
            if target.split(".", 1)[0] == component:
                found.setdefault(target, []).append((update, multiplier))
    return found


def add_update(laid: np.ndarray, layout: str, update, multiplier: float, shape: tuple[int, ...]) -> None:
    """laid += the update in the graph's ``layout``; Linear weights (most of a LoRA) without a full-size temporary
    beyond the product: identity adds up @ down, transpose adds downᵀ @ upᵀ (the [in, out] MatMul operand)."""
    up, down = update.factors(multiplier)  # up: [O, r], down: [r, I * kh * kw]
    if layout == "identity":
        flat = laid.reshape(up.shape[0], -1)  # a view: ``laid`` is contiguous
        flat += up @ down
    elif layout == "transpose":
        laid += down.T @ up.T  # [I, O]
    elif layout == "winograd_f2x2_3x3":  # G (up @ down) Gᵀ = up @ (G down Gᵀ): the r small filters transformed, not K x C
        channels = shape[1]
        laid += up[None] @ winograd_f2x2_3x3(down.reshape(-1, channels, 3, 3))  # [16, K, r] @ [16, r, C] -> [16, K, C]
    elif layout.startswith("nchwc_"):  # a permutation: added through a strided view, no permuted copy
        permuted = apply_layout(layout, (up @ down).reshape(shape), view=True)  # [O/B, I/B, kh, kw, Bi, Bo] (or OIBo)
        blocked = laid.reshape(permuted.shape)  # the stored bytes are in that order
        blocked += permuted
    else:
        laid += apply_layout(layout, update.delta(shape, multiplier))


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or 0 where it does not say."""
    try:
        with open("/proc/meminfo") as handle:
            return next((int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:")), 0)
    except OSError:
        return 0


class ScratchFile:
    """Where merged weights are made: memory when twice their size is free, else a deleted temporary file, mapped.

    While onnxruntime builds a session it copies the overrides, so for a moment both exist. SDXL's U-Net with a LoRA
    on its attention and feed-forward layers is 8.2 GiB of them, which twice over, beside the rest of the pipeline,
    did not fit 24 GiB: in a file they are page cache the kernel can write back and evict (slower: disk traffic).
    """

    def __init__(self, nbytes: int):
        import tempfile

        nbytes = max(nbytes, 1)
        self.in_memory = 2 * nbytes < available_memory()
        if self.in_memory:
            self.buffer = np.empty(nbytes, dtype=np.uint8)
        else:
            self.handle = tempfile.TemporaryFile(prefix="sdfast-lora-")  # unlinked at once: nothing stays on disk
            self.handle.truncate(nbytes)
            self.buffer = np.memmap(self.handle, dtype=np.uint8, mode="r+", shape=(nbytes,))
        self.used = 0

    def array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        start = -(-self.used // 64) * 64  # aligned for onnxruntime's copies
        self.used = start + count
        return self.buffer[start:start + count].view(dtype).reshape(shape)


def initializer_overrides(root: Path, graph: str, graph_map: dict[str, dict], updates: dict[str, list],
                          shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """initializer name -> merged array (in a ScratchFile), for the graph file ``graph`` of an engine dir at ``root``."""
    places = {target: graph_map[target] for target in updates}  # every target placed: PipelineLoras checked it
    scratch = ScratchFile(sum(int(p["length"]) + 64 for p in places.values()))
    overrides = {}
    for target, pairs in updates.items():
        place = places[target]
        try:
            stored = np.memmap(root / place["file"], dtype=np.dtype(place["dtype"]), mode="r", offset=int(place["offset"]),
                               shape=tuple(place["shape"]))
        except (OSError, ValueError) as error:
            raise EngineError(f"engine dir {root}: cannot read {target} from '{place['file']}' ({error})") from None
        merged = scratch.array(stored.shape, stored.dtype)
        # the stored weight as the graph holds it; the merge goes in place (in float32 for an fp16 weight)
        laid = merged if stored.dtype == np.float32 else np.empty(stored.shape, np.float32)
        laid[...] = stored
        for update, multiplier in pairs:
            add_update(laid, place["layout"], update, multiplier, shapes[target])
        if laid is not merged:
            merged[...] = laid
        overrides[place["initializer"]] = merged
        del stored
    return overrides
