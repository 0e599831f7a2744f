"""One component at several image sizes: a static graph per size, every size's weights in one shared data file.

Static shapes are kept because they are faster on the CPU: a dynamic spatial axis measured 1.20x slower at 512x512 and
1.47x at 768x512 (benchmarks/results/README.md, "Dynamic spatial axis"). Each size is exported and parity-checked
against PyTorch like the default size, then sdfast.export.shared_weights puts every graph's weights into one file,
each distinct tensor once, so the engine dir holds the weights once on disk and the runtime once in memory.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

from sdfast.runtime.manifest import size_key

Progress = Callable[[str], None]
INDEX_FORMAT = 1


def size_dependent(recipe, family, model, name: str, precision: str, dims: dict, other_dims: list[dict]) -> bool:
    """Whether component ``name``'s inputs or outputs change with the image size (the U-Net, the VAE; not a text encoder)."""
    def shapes(at: dict):
        component = recipe.component(name, at, precision, fp16_safe=family.fp16_safe(model, name))
        return [t.to_json() for t in (*component.inputs, *component.outputs)]

    return any(shapes(other) != shapes(dims) for other in other_dims)


def export_sizes(request, recipe, family, model, name: str, dims: dict, sized_dims: dict[str, dict], dynamic_json: dict,
                 staging: Path, raw_dir: Path, label: str, progress: Progress) -> dict:
    """Component ``name``'s manifest entry with a 'sizes' block: the default size's graphs under their usual names, each
    other size's as ``{name}.{WxH}.*.onnx``, all over ``{name}.weights``; the LoRA parameter map covers every graph.

    Each size's graphs go into the shared file as soon as they pass parity, so the disk holds one size's own data at a time.
    """
    from sdfast.export.component_export import export_component, lora_fingerprints, parameter_map_entry
    from sdfast.export.shared_weights import SharedWeightsWriter
    from sdfast.export.staging import hashed

    precision = getattr(family, "component_precision", lambda _model, _name, asked: asked)(model, name, request.precision)
    component = recipe.component(name, dims, precision, fp16_safe=family.fp16_safe(model, name))
    lora = lora_fingerprints(request, component, precision, family.WRAPPERS[name](model).eval(), model)
    data_path = staging / f"{name}.weights"
    writer = SharedWeightsWriter(data_path)
    entries: dict[str, dict] = {}
    try:
        for key, at in sized_dims.items():  # the other sizes first, each in a folder of its own; the default size last
            folder = staging / f".size-{key}"
            folder.mkdir()
            sized = entries[key] = export_component(request, recipe, family, model, name, at, dynamic_json, folder, raw_dir,
                                                    f"{label} at {key}", progress, keep_module=True, map_parameters=False)
            moves = []
            for target in (sized, *sized.get("variants", {}).values()):
                renamed = _sized_name(target["file"], name, key)
                moves.append((folder / target["file"], staging / renamed))
                target["file"] = renamed
            writer.add(moves)
            shutil.rmtree(folder)
        entry = export_component(request, recipe, family, model, name, dims, dynamic_json, staging, raw_dir, label, progress,
                                 map_parameters=False)
        writer.add([(staging / target["file"],) * 2 for target in (entry, *entry.get("variants", {}).values())])
    finally:
        shared = writer.close()
    index_path = staging / f"{name}.weights.json"
    index_path.write_text(json.dumps({"format": INDEX_FORMAT, "file": shared["file"], "graphs": shared["graphs"]},
                                     separators=(",", ":")) + "\n")
    data_entry = hashed(staging, [data_path])  # hashed once: every graph lists it
    graph_entries = [entry, *entry.get("variants", {}).values(), *(t for s in entries.values() for t in (s, *s.get("variants", {}).values()))]
    for target in graph_entries:
        target["files"] = {**hashed(staging, [staging / target["file"]]), **data_entry}
    entry["shared_weights"] = {"file": data_path.name, "index": index_path.name, "files": {**data_entry, **hashed(staging, [index_path])},
                               "tensors": shared["tensors"], "stored": shared["stored"], "saved_bytes": shared["saved_bytes"]}
    entry["sizes"] = {key: {field: sized[field] for field in ("file", "files", "inputs", "outputs", "flops", "parity", "variants")
                            if field in sized} for key, sized in entries.items()}
    progress(f"{label}: {shared['stored']} distinct weights of {shared['tensors']} stored once for "
             f"{', '.join([size_key(dims['width'], dims['height']), *sized_dims])} ({shared['saved_bytes'] / 2**30:.2f} GiB not written again)")
    if lora is not None:
        entry["parameter_map"] = parameter_map_entry(name, lora, [staging / target["file"] for target in graph_entries], staging, label,
                                                     progress)
    return entry


def _sized_name(file_name: str, component: str, key: str) -> str:
    """unet.onnx -> unet.768x512.onnx; unet.cpu.onnx -> unet.768x512.cpu.onnx."""
    return f"{component}.{key}{file_name[len(component):]}"


def extra_size_dims(family, recipe, model, request, sizes: list[tuple[int, int]]) -> dict[str, dict]:
    """The dimensions at each extra (width, height), keyed "WxH"."""
    return {size_key(width, height): family.dimensions(dataclasses.replace(request, height=height, width=width), recipe, model)
            for width, height in sizes}
