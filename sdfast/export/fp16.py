"""fp32 -> fp16 graphs with onnxruntime's converter, keeping the recipe's numerically sensitive ops in fp32.

The engine's inputs and outputs stay fp32 (``keep_io_types``): the runtime feeds numpy float32 and the casts at the
boundary are two small kernels per call. onnxruntime.transformers.float16 inserts one Cast per consumer of a blocked
op's fp16 input and reuses its name when one tensor feeds several blocked ops, which leaves a graph onnxruntime
refuses ("two nodes with same node name"); ``_drop_duplicate_casts`` removes the identical copies.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import onnx

from sdfast.errors import ExportError
from sdfast.export.onnx_export import EXTERNAL_DATA_THRESHOLD

CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16"


@dataclass(frozen=True)
class KeptMatMuls:
    """MatMuls that stay fp32 in an fp16 graph and unquantized in an int8 one, known by their weight's [in, out] shape."""

    shapes: tuple[tuple[int, int], ...]
    why: str

    def nodes(self, graph: onnx.GraphProto, component: str) -> list[str]:
        """Names of the MatMuls whose second input is an initializer of one of ``shapes`` (read without its data); an
        ExportError when there is none, or one has no name (the fp16 and int8 tools exclude nodes by name)."""
        weights = {init.name: tuple(init.dims) for init in graph.initializer}
        found = [node.name for node in graph.node
                 if node.op_type == "MatMul" and len(node.input) > 1 and weights.get(node.input[1]) in self.shapes]
        if not found or not all(found):
            what = "none is in the graph" if not found else "one of them has no name"
            raise ExportError(f"{component}: the export keeps the MatMuls with weights "
                              f"{', '.join('x'.join(map(str, shape)) for shape in self.shapes)} in fp32, but {what}")
        return found

    def to_json(self, found: int) -> dict:
        return {"nodes": found, "weight_shapes": [list(shape) for shape in self.shapes], "why": self.why}


def modules_kept_fp32(module) -> KeptMatMuls | None:
    """The Linear layers a transformers model inside ``module`` keeps in fp32 (its ``_keep_in_fp32_modules``), or None.

    T5's feed-forward output ``wo``: its outputs pass fp16's 65504 in T5 v1.1 and T5-XXL, and transformers keeps it out
    of 8-bit too ("to make 8bit quantization work for google/flan-t5-xxl"): the activations entering it have outliers.
    """
    import torch

    shapes, owners, owner_paths = set(), set(), []
    for path, sub in module.named_modules():
        keep = getattr(sub, "_keep_in_fp32_modules", None)
        if not keep or any(path.startswith(owner + ".") for owner in owner_paths):  # T5Stack inherits its parent's list
            continue
        owner_paths.append(path)
        for name, layer in sub.named_modules():
            if isinstance(layer, torch.nn.Linear) and any(part in keep for part in name.split(".")):
                shapes.add((layer.in_features, layer.out_features))
                owners.add(f"{type(sub).__name__}._keep_in_fp32_modules {sorted(keep)}")
    if not shapes:
        return None
    return KeptMatMuls(tuple(sorted(shapes)), f"{', '.join(sorted(owners))}: transformers keeps these layers out of fp16 "
                       "(their outputs overflow it) and of 8-bit quantization (outliers in their inputs)")


def convert_to_fp16(src: Path, out: Path, keep_fp32_ops: list[str], fp32_attention_scores: str | None = None,
                    kept_matmuls: KeptMatMuls | None = None) -> tuple[list[Path], dict]:
    """Write ``src`` as fp16 to ``out`` (+ ``.data`` when large); returns the files and the manifest's ``fp16`` record.

    ``fp32_attention_scores`` (the reason, or None): keep every attention's Q·Kᵀ, its scaling and its Softmax in fp32, as
    diffusers' upcast_attention does (SD 2.1's scores overflow fp16's 65504); the ·V product stays fp16, as there.
    ``kept_matmuls``: MatMuls that stay fp32, weights included (T5's ``wo``). Between two nodes kept fp32 by this call's
    policy (the recipe's op types, the scores, the kept MatMuls) tensors pass in fp32, never through an fp16 Cast.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # the converter places its Casts from value_info; infer it by path, which works past protobuf's 2 GiB
    inferred = src.with_name(src.stem + ".inferred.onnx")
    _declare_domains(src)
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    model = onnx.load(str(inferred))
    inferred.unlink()
    block_list = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    _unique_node_names(model.graph)  # the converter's node block list goes by name
    score_nodes = attention_score_nodes(model.graph) if fp32_attention_scores else []
    if fp32_attention_scores and not score_nodes:
        raise ExportError(f"{src.name}: the fp16 policy keeps attention scores fp32 ({fp32_attention_scores}), but no "
                          "MatMul -> Softmax attention was found in the graph")
    matmul_nodes = kept_matmuls.nodes(model.graph, src.name.split(".")[0]) if kept_matmuls else []
    policy = set(score_nodes) | set(matmul_nodes) | {node.name for node in model.graph.node if node.op_type in keep_fp32_ops}
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block_list,
                                         node_block_list=score_nodes + matmul_nodes, disable_shape_infer=True)
    del model
    removed = _drop_duplicate_casts(converted.graph)
    round_trips = _keep_fp32_between(converted.graph, policy) if policy else 0
    _unique_node_names(converted.graph)
    _sort_topologically(converted.graph)
    kept_names = set(score_nodes) | set(matmul_nodes)
    kept = collections.Counter(node.op_type for node in converted.graph.node if node.op_type in block_list or node.name in kept_names)
    fp16_nodes = sum(1 for node in converted.graph.node
                     if node.op_type not in block_list and node.name not in kept_names and node.op_type != "Cast")
    # the weights go to a side file, as every graph's do: the runtime reads a LoRA's base weights from there
    onnx.save(converted, str(out), save_as_external_data=True, location=out.name + ".data", size_threshold=1024)
    files = [path for path in (out, out.with_name(out.name + ".data")) if path.exists()]
    record = {
        "converter": CONVERTER,
        "io_dtype": "float32",
        "requested_fp32_ops": sorted(keep_fp32_ops),
        "kept_fp32_ops": dict(sorted(kept.items())),  # op type -> nodes that still compute in fp32 (recipe's list and the converter's own)
        "fp16_nodes": fp16_nodes,
        **({"fp32_attention_scores": {"nodes": len(score_nodes), "why": fp32_attention_scores}} if fp32_attention_scores else {}),
        **({"fp32_matmuls": kept_matmuls.to_json(len(matmul_nodes))} if kept_matmuls else {}),
        "fp16_round_trips_removed": round_trips,  # fp32 -> fp16 -> fp32 Casts dropped between two kept nodes
        "duplicate_casts_removed": removed,
    }
    return files, record


def attention_score_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of each attention's score path: Softmax, the MatMul (Q·Kᵀ) feeding it, and the Muls scaling Q and K there."""
    producer = {out: node for node in graph.node for out in node.output}
    names = []
    for softmax in (node for node in graph.node if node.op_type == "Softmax"):
        scores = producer.get(softmax.input[0])
        if scores is None or scores.op_type != "MatMul":
            continue
        names += [softmax.name, scores.name]
        names += [p.name for p in (producer.get(i) for i in scores.input) if p is not None and p.op_type == "Mul"]
    return names


def _keep_fp32_between(graph: onnx.GraphProto, kept: set[str]) -> int:
    """Drop the fp32 -> fp16 -> fp32 Cast round trips the converter puts between two kept nodes, or between an fp32 graph
    input and kept nodes (a score, or T5's residual stream, through fp16 is what overflows); returns how many tensors
    now pass in fp32."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    dead, rewired, fp32_tensors = set(), 0, set()
    graph_outputs = {output.name for output in graph.output}
    fp32_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}  # keep_io_types'
    for down in [n for n in graph.node if n.op_type == "Cast" and _cast_to(n) == onnx.TensorProto.FLOAT]:
        if not consumers[down.output[0]] or down.output[0] in graph_outputs:  # keep_io_types' last Cast writes the output
            continue
        up = producer.get(down.input[0])
        if up is None or up.op_type != "Cast" or _cast_to(up) != onnx.TensorProto.FLOAT16:
            continue
        source = producer.get(up.input[0])
        from_fp32 = up.input[0] in fp32_inputs if source is None else source.name in kept
        if not from_fp32 or not all(c.name in kept for c in consumers[down.output[0]]):
            continue
        for consumer in consumers[down.output[0]]:
            consumer.input[:] = [up.input[0] if name == down.output[0] else name for name in consumer.input]
        fp32_tensors.add(up.input[0])
        dead.add(id(down))
        if up.output[0] not in graph_outputs and all(id(c) in dead for c in consumers[up.output[0]]):  # the fp16 copy feeds nothing else now
            dead.add(id(up))
        rewired += 1
    stale = [v for v in graph.value_info if v.name in fp32_tensors]  # the converter declared them fp16
    for value in stale:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    if dead:
        nodes = [node for node in graph.node if id(node) not in dead]
        del graph.node[:]
        graph.node.extend(nodes)
    return rewired


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Put each node after its inputs' producers, as ONNX requires (the converter appends some of its Casts after their
    consumers; onnxruntime sorts by itself, ONNX's checker and reference evaluator do not). Order-preserving: nodes
    keep their places but for a producer that came late, which moves up to just before its first consumer."""
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output if out}  # "": an omitted optional output
    state = [0] * len(graph.node)  # 0 not placed, 1 being placed (its producers first), 2 placed
    order: list[int] = []
    for start in range(len(graph.node)):
        stack = [(start, False)]
        while stack:
            index, producers_placed = stack.pop()
            if producers_placed:
                state[index] = 2
                order.append(index)
                continue
            if state[index] == 2:
                continue
            if state[index] == 1:
                raise ExportError(f"fp16 conversion left a cycle in the graph at node '{graph.node[index].name}'")
            state[index] = 1
            stack.append((index, True))
            for name in reversed(graph.node[index].input):
                before = producer.get(name)
                if before is not None and state[before] != 2:
                    stack.append((before, False))
    nodes = [graph.node[index] for index in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _cast_to(node: onnx.NodeProto) -> int | None:
    """A Cast node's target element type."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)


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
    """Every node named, and uniquely (onnxruntime refuses duplicates; the converter's node block list goes by name)."""
    names: collections.Counter = collections.Counter()
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"sdfast_{node.op_type}_{index}"
        if names[node.name]:
            node.name = f"{node.name}_{names[node.name]}"
        names[node.name] += 1
