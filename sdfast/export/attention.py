"""Fuse the exported attention (MatMul, Softmax, MatMul with their reshapes) into onnxruntime's MultiHeadAttention.

torch.onnx exports scaled_dot_product_attention as Q·Kᵀ, Softmax and ·V, which materializes the
[B, heads, S, S] score matrix: 1 GiB per self-attention at 512x512 for batch 2. onnxruntime's
com.microsoft MultiHeadAttention takes Q, K, V as [B, S, heads x d] and computes it blockwise
(FlashAttention, Dao et al. 2022, on its CPU provider), so the scores never reach memory.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        for output in graph.output:  # a graph output is a consumer no rewrite may take away
            self.consumers.setdefault(output.name, []).append(helper.make_node("Identity", [output.name], [output.name + "_graph_output"]))
        self.constants = {init.name: init for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t

    def parent(self, node: onnx.NodeProto | None, index: int, op_type: str) -> onnx.NodeProto | None:
        if node is None or len(node.input) <= index:
            return None
        parent = self.producer.get(node.input[index])
        return parent if parent is not None and parent.op_type == op_type else None

    def only_child(self, name: str, op_type: str) -> onnx.NodeProto | None:
        children = self.consumers.get(name, [])
        return children[0] if len(children) == 1 and children[0].op_type == op_type else None

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


def _heads_from_reshape(g: _Graph, reshape: onnx.NodeProto | None) -> int | None:
    shape = g.constant(reshape.input[1]) if reshape is not None else None
    return int(shape[2]) if shape is not None and shape.size == 4 and shape[2] > 0 else None


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace each matched attention with one MultiHeadAttention node; returns (model, how many)."""
    g = _Graph(model.graph)
    replaced: dict[int, onnx.NodeProto] = {}  # id of the node the fused one stands in for -> the fused node
    dead: set[int] = set()
    count = 0
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        scores = g.parent(softmax, 0, "MatMul")
        q_scaled, k_scaled = g.parent(scores, 0, "Mul"), g.parent(scores, 1, "Mul")
        if q_scaled is None or k_scaled is None:
            continue
        q_scale, k_scale = g.constant(q_scaled.input[1]), g.constant(k_scaled.input[1])
        q_transpose = g.parent(q_scaled, 0, "Transpose")
        q_reshape = g.parent(q_transpose, 0, "Reshape")
        # Kᵀ: Reshape(Transpose(Reshape(Transpose(Reshape(k)))))
        k_t3 = g.parent(k_scaled, 0, "Reshape")
        k_t2 = g.parent(k_t3, 0, "Transpose")
        k_t1 = g.parent(k_t2, 0, "Reshape")
        k_transpose = g.parent(k_t1, 0, "Transpose")
        k_reshape = g.parent(k_transpose, 0, "Reshape")
        weighted = g.only_child(softmax.output[0], "MatMul")
        v_transpose = g.parent(weighted, 1, "Transpose") if weighted is not None else None
        v_reshape = g.parent(v_transpose, 0, "Reshape")
        out_transpose = g.only_child(weighted.output[0], "Transpose") if weighted is not None else None
        out_reshape = g.only_child(out_transpose.output[0], "Reshape") if out_transpose is not None else None
        chain = [q_scaled, k_scaled, q_transpose, q_reshape, k_t3, k_t2, k_t1, k_transpose, k_reshape, weighted, v_transpose,
                 v_reshape, out_transpose, out_reshape]
        if any(node is None for node in chain) or q_scale is None or k_scale is None or q_scale.size != 1 or k_scale.size != 1:
            continue
        heads = _heads_from_reshape(g, q_reshape)
        if heads is None or heads != _heads_from_reshape(g, k_reshape) or heads != _heads_from_reshape(g, v_reshape):
            continue
        if any(list(helper.get_attribute_value(a)) != [0, 2, 1, 3] for t in (q_transpose, v_transpose, out_transpose)
               for a in t.attribute if a.name == "perm"):
            continue
        # the intermediates must feed nothing else, or removing them would break the graph
        inner = [q_scaled, k_scaled, scores, softmax, weighted, out_transpose, q_transpose, k_t3, k_t2, k_t1, k_transpose, v_transpose]
        if any(len(g.consumers.get(node.output[0], [])) != 1 for node in inner):
            continue
        fused = helper.make_node(
            "MultiHeadAttention", [q_reshape.input[0], k_reshape.input[0], v_reshape.input[0]], [out_reshape.output[0]],
            name=f"sdfast_mha_{count}", domain="com.microsoft", num_heads=heads, scale=float(q_scale.item() * k_scale.item()),
        )
        replaced[id(out_reshape)] = fused
        dead.update(id(node) for node in inner + [scores])
        for reshape in (q_reshape, k_reshape, v_reshape):
            if len(g.consumers.get(reshape.output[0], [])) == 1:
                dead.add(id(reshape))
        count += 1
    if count:
        nodes = [replaced.get(id(node), node) for node in model.graph.node if id(node) not in dead]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(op.domain == "com.microsoft" for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, count
