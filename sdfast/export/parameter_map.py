"""Where each model parameter a LoRA can patch went in the exported graphs: which initializer, through which layout.

The exporter and onnxruntime's optimizer rename, transpose, fold and re-lay weights (a Linear's weight becomes a
MatMul's transposed constant; the CPU variant's 3x3 convolutions hold Winograd or NCHWc-blocked filters). Rather than
predict each rewrite, the export fingerprints every Linear and Conv2d weight under each layout it could take
(sdfast.runtime.lora.weight_layouts) and looks the graph's initializers up by the same fingerprint: a match means the
bytes are equal, so the recorded layout is the one in the file. The runtime reads the base weight where the map says,
adds the LoRA's delta in that layout, and overrides the initializer (sdfast.runtime.lora.patcher).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MAP_FORMAT = 1
LORA_ROLES = ("denoiser", "text_encoder")  # the components LoRA files patch: the U-Net and the text encoders


def _digest(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    header = f"{array.dtype.str}{array.shape}".encode()
    return hashlib.sha1(header + memoryview(array).cast("B"), usedforsecurity=False).digest()


def _to_fp16(array: np.ndarray) -> np.ndarray:
    """As onnxruntime's fp16 converter casts an initializer (it clamps tiny and huge magnitudes first)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    return convert_np_to_float16(array)


def lora_weights(owners: dict[str, object]) -> dict[str, object]:
    """Every Linear and Conv2d weight parameter of ``owners`` (the pipeline's components: unet, text_encoder, ...), named
    as a LoRA names it: the component, then the path inside it."""
    import torch

    return {f"{owner_name}.{path}.weight": layer.weight for owner_name, owner in owners.items()
            for path, layer in owner.named_modules() if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}


def lora_targets(module, owners: dict[str, object]) -> dict[str, "np.ndarray"]:
    """The LoRA-patchable weights (``lora_weights``) that ``module`` (an export wrapper) uses, as float32 arrays."""
    used = {id(parameter) for parameter in module.parameters()}
    return {name: weight.detach().float().numpy() for name, weight in lora_weights(owners).items() if id(weight) in used}


def owners_of(model) -> dict[str, object]:
    """The family's loaded PyTorch components by their pipeline names (unet, text_encoder, text_encoder_2, ...)."""
    import torch

    return {name: value for name, value in vars(model).items() if isinstance(value, torch.nn.Module)}


def fingerprints(targets: dict[str, np.ndarray], fp16: bool, nchwc_block: int | None) -> dict[bytes, list[tuple[str, str]]]:
    """digest -> [(parameter, layout)] for every layout each target may take in an exported graph.

    ``nchwc_block``: the CPU's NCHWc block (16 with AVX-512, 8 with AVX2), whose filter layouts onnxruntime writes into
    the CPU variant; None when no CPU variant is written. fp16: the portable graph's weights are fp16.
    """
    from sdfast.runtime.lora.weight_layouts import layouts_for

    found: dict[bytes, list[tuple[str, str]]] = {}
    for name, weight in targets.items():
        for layout, function in layouts_for(weight.shape).items():
            block = layout.rsplit("_", 1)[-1] if layout.startswith("nchwc") else None
            if block is not None and (nchwc_block is None or int(block) != nchwc_block):
                continue
            laid = function(weight)
            for array in ((laid, _to_fp16(laid)) if fp16 else (laid,)):
                found.setdefault(_digest(array), []).append((name, layout))
    return found


def map_graph(graph: Path, prints: dict[bytes, list[tuple[str, str]]], shapes: set[tuple[int, ...]]) -> dict[str, dict]:
    """parameter -> {initializer, layout, data file, offset, length, dtype, shape} for ``graph`` (its weights external).

    A parameter matched by two initializers, or an initializer by two parameters, is left out: the patch must have
    one place to land. Initializers held inside the .onnx file (under 1 KiB) cannot be read by the runtime, and are
    left out too.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    placed: dict[str, list[dict]] = {}
    for init in model.graph.initializer:
        if tuple(init.dims) not in shapes or init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        array = numpy_helper.to_array(init, str(graph.parent))
        matches = dict(prints.get(_digest(array), []))  # name -> layout: a 1x1 filter's two NCHWc layouts are the same bytes
        for name, layout in matches.items():
            external = {entry.key: entry.value for entry in init.external_data}
            placed.setdefault(name, []).append({
                "initializer": init.name, "layout": layout, "file": external["location"],
                "offset": int(external.get("offset", 0)), "length": int(external.get("length", array.nbytes)),
                "dtype": str(array.dtype), "shape": list(array.shape),
            })
    initializer_uses: dict[str, int] = {}
    for places in placed.values():
        for place in places:
            initializer_uses[place["initializer"]] = initializer_uses.get(place["initializer"], 0) + 1
    return {name: places[0] for name, places in sorted(placed.items())
            if len(places) == 1 and initializer_uses[places[0]["initializer"]] == 1}


def write_parameter_map(component: str, target_shapes: dict[str, tuple[int, ...]], prints, graph_files: list[Path],
                        staging: Path) -> tuple[Path, dict]:
    """Write ``{component}.parameters.json`` (every graph's map) into ``staging``; returns its path and a summary per graph."""
    shapes = {laid for shape in target_shapes.values() for laid in _laid_shapes(shape)}
    graphs, summary = {}, {}
    for graph in graph_files:
        mapped = map_graph(graph, prints, shapes)
        graphs[graph.name] = mapped
        summary[graph.name] = {"mapped": len(mapped), "of": len(target_shapes)}
    path = staging / f"{component}.parameters.json"
    path.write_text(json.dumps({"format": MAP_FORMAT, "parameters": {name: list(shape) for name, shape in sorted(target_shapes.items())},
                                "graphs": graphs}, separators=(",", ":")) + "\n")
    return path, summary


def _laid_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes of a weight's layouts: the same, transposed, or Winograd's [16, K, C]."""
    shapes = [tuple(shape), tuple(reversed(shape))]
    return shapes + [(16, shape[0], shape[1])] if len(shape) == 4 else shapes
