"""Rewrite 3x3 convolutions as Winograd F(2x2, 3x3) in the ONNX graph: 2.25x fewer multiplications.

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016). Each 4x4 input tile d
becomes V = B^T d B (a fixed stride-2 4x4 convolution), the weights become U = G g G^T (at export), the
16 products U_e V_e are one batched MatMul, and Y = A^T M A (a 4x16 MatMul, then DepthToSpace) gives the
2x2 output tile. The arithmetic stays fp32; only the order of the sums changes (the export's parity
check measures it). Small maps are left alone: below ``min_tiles`` tiles the weight transform's larger
weights cost more memory traffic than the saved multiplications.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from sdfast.export.flops import known_shapes
from sdfast.runtime.lora.weight_layouts import winograd_f2x2_3x3

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)  # input transform
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)  # output transform


# the weight transform U = G g Gᵀ lives with the runtime's weight layouts: a LoRA's delta goes through the same function
transform_weights = winograd_f2x2_3x3


def input_filters() -> np.ndarray:
    """B^T d B as 16 fixed 4x4 filters: filter (a, b) weighs tile pixel (i, j) by B^T[a, i] * B^T[b, j]."""
    return np.einsum("ai,bj->abij", B_T, B_T).reshape(16, 1, 4, 4).astype(np.float32)


def output_matrix() -> np.ndarray:
    """A^T M A as one [4, 16] matrix: output pixel (r, s) of the 2x2 tile from the 16 products."""
    return np.einsum("ra,sb->rsab", A_T, A_T).reshape(4, 16).astype(np.float32)


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _without_large_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with only small initializers' values (shape constants): enough for shape inference, under protobuf's 2 GiB."""
    light = onnx.ModelProto()
    light.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import))
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if init.raw_data and len(init.raw_data) > 4096:
            light.graph.initializer.append(onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
        else:
            light.graph.initializer.append(init)
    return light


def rewrite_convolutions(model: onnx.ModelProto, weights, min_tiles: int = 64, make_initializer=numpy_helper.from_array) -> tuple[onnx.ModelProto, int]:
    """Replace each eligible Conv (3x3, stride 1, pad 1, no groups or dilation, even H and W) in place; returns (model, count).

    ``weights`` maps initializer names to their arrays (``get`` and ``[]``; the model may keep them in external data).
    ``make_initializer(array, name)`` makes each new weight's TensorProto (it may write the array out and reference it).
    """
    inferred = shape_inference.infer_shapes(_without_large_weights(model), data_prop=True)
    shapes = known_shapes(inferred)
    graph = model.graph
    new_nodes, new_initializers, count = [], [], 0
    shared = {"wino_bt": input_filters(), "wino_at": output_matrix()}
    for node in graph.node:
        x_shape = shapes.get(node.input[0]) if node.op_type == "Conv" else None
        weight = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        eligible = (
            x_shape is not None and len(x_shape) == 4 and weight is not None and weight.shape[2:] == (3, 3)
            and _attribute(node, "group", 1) == 1 and list(_attribute(node, "strides", [1, 1])) == [1, 1]
            and list(_attribute(node, "dilations", [1, 1])) == [1, 1] and list(_attribute(node, "pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
            and _attribute(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            and x_shape[2] % 2 == 0 and x_shape[3] % 2 == 0 and (x_shape[2] // 2) * (x_shape[3] // 2) >= min_tiles
        )
        if not eligible:
            new_nodes.append(node)
            continue
        n, c, h, w = x_shape
        k = weight.shape[0]
        th, tw = h // 2, w // 2
        prefix = f"wino{count}"
        u_name = f"{prefix}_u"
        new_initializers.append(make_initializer(transform_weights(weight), u_name))
        consts = {
            "s_tiles_in": [n * c, 1, h, w], "s_v": [n, c, 16, th * tw], "s_m": [n, 16, k * th * tw], "s_y": [n, 4 * k, th, tw],
        }
        for key, value in consts.items():
            new_initializers.append(numpy_helper.from_array(np.array(value, dtype=np.int64), f"{prefix}_{key}"))
        x = node.input[0]
        out = node.output[0]
        block = [
            helper.make_node("Reshape", [x, f"{prefix}_s_tiles_in"], [f"{prefix}_planes"]),  # [N*C, 1, H, W]
            helper.make_node("Conv", [f"{prefix}_planes", "wino_bt"], [f"{prefix}_v0"], strides=[2, 2], pads=[1, 1, 1, 1]),  # [N*C, 16, H/2, W/2]
            helper.make_node("Reshape", [f"{prefix}_v0", f"{prefix}_s_v"], [f"{prefix}_v1"]),  # [N, C, 16, T]
            helper.make_node("Transpose", [f"{prefix}_v1"], [f"{prefix}_v"], perm=[0, 2, 1, 3]),  # [N, 16, C, T]
            helper.make_node("MatMul", [u_name, f"{prefix}_v"], [f"{prefix}_m0"]),  # [16, K, C] @ [N, 16, C, T] -> [N, 16, K, T]
            helper.make_node("Reshape", [f"{prefix}_m0", f"{prefix}_s_m"], [f"{prefix}_m"]),  # [N, 16, K*T]
            helper.make_node("MatMul", ["wino_at", f"{prefix}_m"], [f"{prefix}_y0"]),  # [4, 16] @ [N, 16, K*T] -> [N, 4, K*T]
            helper.make_node("Reshape", [f"{prefix}_y0", f"{prefix}_s_y"], [f"{prefix}_y1"]),  # [N, 4K, H/2, W/2], channel = (r*2+s)*K + k
        ]
        if len(node.input) > 2 and node.input[2]:
            block.append(helper.make_node("DepthToSpace", [f"{prefix}_y1"], [f"{prefix}_y2"], blocksize=2, mode="DCR"))  # [N, K, H, W]
            bias_name = f"{prefix}_bias"
            new_initializers.append(numpy_helper.from_array(weights[node.input[2]].reshape(1, k, 1, 1).astype(np.float32), bias_name))
            block.append(helper.make_node("Add", [f"{prefix}_y2", bias_name], [out]))
        else:
            block.append(helper.make_node("DepthToSpace", [f"{prefix}_y1"], [out], blocksize=2, mode="DCR"))
        for step, new_node in enumerate(block):  # named after the convolution they replace, so profiles and errors point at it
            new_node.name = f"{node.name or prefix}/winograd_{step}_{new_node.op_type}"
        new_nodes += block
        count += 1
    if count:
        new_initializers += [numpy_helper.from_array(value, name) for name, value in shared.items()]
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(new_initializers)
        used = {name for node in graph.node for name in node.input}
        kept = [init for init in graph.initializer if init.name in used]  # the replaced 3x3 weights are gone
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return model, count
