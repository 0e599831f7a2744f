"""A LoRA's deltas merged into an engine's stored weights, as initializer overrides for a new session.

For each patched weight the parameter map (written at export, sdfast.export.parameter_map) says which initializer of
the loaded graph holds it, in which layout, and where its bytes are in the graph's data file. The merged initializer
is stored + layout(sum of multiplier x delta): every layout is linear, so this equals exporting the merged weight.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdfast.errors import EngineError, RequestError
from sdfast.runtime.lora.weight_layouts import apply_layout


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


def merged_deltas(component: str, uses, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """target weight -> sum of multiplier x delta over the LoRAs (``uses``: (LoraFile, multiplier) pairs), for ``component``;
    ``shapes``: each weight's shape in the model."""
    deltas: dict[str, np.ndarray] = {}
    for lora, multiplier in uses:
        if multiplier == 0:
            continue
        for target, update in lora.updates.items():
            if target.split(".", 1)[0] != component:
                continue
            # the delta in the weight's own shape: [O, I] for a Linear, [O, I, kh, kw] for a convolution
            delta = update.delta(shapes[target]) * np.float32(multiplier)
            deltas[target] = delta if target not in deltas else deltas[target] + delta
    return deltas


def initializer_overrides(root: Path, graph: str, graph_map: dict[str, dict], deltas: dict[str, np.ndarray],
                          lora_names: str) -> dict[str, np.ndarray]:
    """initializer name -> merged array, for the graph file ``graph`` of an engine dir at ``root``."""
    overrides = {}
    for target, delta in deltas.items():
        place = graph_map.get(target)
        if place is None:
            raise RequestError(f"LoRA {lora_names} changes {target}, which this engine's {graph} holds in a form sdfast "
                               "cannot patch (a fused or re-laid weight the export could not place)")
        try:
            stored = np.memmap(root / place["file"], dtype=np.dtype(place["dtype"]), mode="r", offset=int(place["offset"]),
                               shape=tuple(place["shape"]))
        except (OSError, ValueError) as error:
            raise EngineError(f"engine dir {root}: cannot read {target} from '{place['file']}' ({error})") from None
        laid = apply_layout(place["layout"], delta)  # the delta as the graph holds the weight
        if laid.shape != stored.shape:
            raise EngineError(f"engine dir {root}: the parameter map's {target} is {list(stored.shape)}, its delta {list(laid.shape)}")
        overrides[place["initializer"]] = (stored.astype(np.float32) + laid).astype(stored.dtype)
        del stored
    return overrides
