"""fp32 -> fp16 graphs with onnxruntime's converter, keeping the recipe's numerically sensitive ops in fp32.

The engine's inputs and outputs stay fp32 (``keep_io_types``): the runtime feeds numpy float32 and the casts at the
boundary are two small kernels per call. onnxruntime.transformers.float16 inserts one Cast per consumer of a blocked
op's fp16 input and reuses its name when one tensor feeds several blocked ops, which leaves a graph onnxruntime
refuses ("two nodes with same node name"); ``_drop_duplicate_casts`` removes the identical copies.
"""
from __future__ import annotations

import collections
from pathlib import Path

import onnx

from sdfast.export.onnx_export import EXTERNAL_DATA_THRESHOLD

CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16"


def convert_to_fp16(src: Path, out: Path, keep_fp32_ops: list[str]) -> tuple[list[Path], dict]:
    """Write ``src`` as fp16 to ``out`` (+ ``.data`` when large); returns the files and the manifest's ``fp16`` record."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # the converter places its Casts from value_info; infer it by path, which works past protobuf's 2 GiB
    inferred = src.with_name(src.stem + ".inferred.onnx")
    _declare_domains(src)
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    model = onnx.load(str(inferred))
    inferred.unlink()
    block_list = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block_list, disable_shape_infer=True)
    del model
    removed = _drop_duplicate_casts(converted.graph)
    _unique_node_names(converted.graph)
    kept = collections.Counter(node.op_type for node in converted.graph.node if node.op_type in block_list)
    fp16_nodes = sum(1 for node in converted.graph.node if node.op_type not in block_list and node.op_type != "Cast")
    files = [out]
    large = sum(init.ByteSize() for init in converted.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    if large:
        onnx.save(converted, str(out), save_as_external_data=True, location=out.name + ".data", size_threshold=1024)
        files.append(out.with_name(out.name + ".data"))
    else:
        onnx.save(converted, str(out))
    record = {
        "converter": CONVERTER,
        "io_dtype": "float32",
        "requested_fp32_ops": sorted(keep_fp32_ops),
        "kept_fp32_ops": dict(sorted(kept.items())),  # op type -> nodes that still compute in fp32 (recipe's list and the converter's own)
        "fp16_nodes": fp16_nodes,
        "duplicate_casts_removed": removed,
    }
    return files, record


def _declare_domains(path: Path) -> None:
    """onnxruntime's optimizer can leave com.microsoft ops without their opset import, which ONNX's shape inference refuses."""
    model = onnx.load(str(path), load_external_data=False)
    declared = {opset.domain for opset in model.opset_import}
    missing = {node.domain for node in model.graph.node if node.domain not in declared and node.domain not in ("", "ai.onnx")}
    if missing:
        model.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in sorted(missing))
        onnx.save(model, str(path))


def _drop_duplicate_casts(graph: onnx.GraphProto) -> int:
    """Remove nodes that repeat an earlier node exactly (same op, inputs, outputs and attributes); returns how many."""
    seen: dict[tuple[str, ...], onnx.NodeProto] = {}
    kept, removed = [], 0
    for node in graph.node:
        key = tuple(node.output)
        first = seen.get(key)
        if first is None:
            seen[key] = node
            kept.append(node)
            continue
        if (first.op_type, list(first.input), list(first.attribute)) != (node.op_type, list(node.input), list(node.attribute)):
            raise ValueError(f"fp16 conversion: two different nodes write '{key[0]}'")
        removed += 1
    del graph.node[:]
    graph.node.extend(kept)
    return removed


def _unique_node_names(graph: onnx.GraphProto) -> None:
    names: collections.Counter = collections.Counter()
    for node in graph.node:
        if node.name and names[node.name]:
            node.name = f"{node.name}_{names[node.name]}"
        names[node.name] += 1
