"""The arithmetic of an exported graph: multiply-accumulates of its Conv, ConvTranspose, MatMul and Gemm nodes.

One multiply-accumulate counts as 2 FLOPs, the convention of torch.utils.flop_counter and of published
GFLOP/s figures. Element-wise ops (norms, activations, softmax) are left out: they are a few percent of
the U-Net's arithmetic and bound by memory, not by the FMA units. A dynamic axis is counted at the size
given (the prompt's tokens at one 77-token chunk), and the figure says so in the manifest.
"""
from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import shape_inference

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def count_flops(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> int:
    """FLOPs of one call of the ONNX graph at ``path`` with its inputs at ``input_shapes`` (which fixes any dynamic axis)."""
    model = onnx.load(str(path), load_external_data=False)  # initializers keep their dims without their data
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        given = input_shapes.get(value.name)
        if given is None or len(given) != len(dims):
            raise ValueError(f"{path.name}: give a shape of rank {len(dims)} for input '{value.name}'")
        for dim, size in zip(dims, given):
            dim.dim_value = size  # also replaces a symbolic dim_param
    del model.graph.value_info[:]  # stale symbolic shapes; infer again from the now static inputs
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = known_shapes(model)
    return sum(_node_flops(node, shapes) for node in model.graph.node if node.op_type in COUNTED_OPS)


def known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every tensor whose shape is fully static after shape inference: initializers, inputs, intermediates, Constant outputs."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for node in model.graph.node:  # Constant nodes carry their shape in an attribute
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    return shapes


def _node_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise ValueError(f"cannot count FLOPs of {node.op_type} node '{node.name}': the shape of '{name}' is unknown")
        return shapes[name]

    if node.op_type == "Conv":
        weight = shape(node.input[1])  # [C_out, C_in / groups, kH, kW]
        out = shape(node.output[0])  # [N, C_out, H_out, W_out]
        return 2 * math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":
        weight = shape(node.input[1])  # [C_in, C_out / groups, kH, kW]
        x = shape(node.input[0])  # [N, C_in, H, W]: every input pixel scatters into C_out/groups x kH x kW outputs
        return 2 * math.prod(x) * math.prod(weight[1:])
    if node.op_type == "MatMul":
        a = shape(node.input[0])  # [..., M, K] @ [..., K, N] -> [..., M, N]
        return 2 * math.prod(shape(node.output[0])) * a[-1]
    # Gemm: Y = alpha * A' B' + beta * C
    a = shape(node.input[0])
    trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
    out = shape(node.output[0])
    return 2 * math.prod(out) * (a[0] if trans_a else a[1])
