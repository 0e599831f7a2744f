"""Selective static int8 for a denoiser graph: which nodes are quantized, and onnxruntime's QDQ quantization of them.

The policy is structural, so it holds for any U-Net exported by sdfast (node names are the exporter's, not the modules'):
- kept fp32 always: the attention scores (MatMuls of two activations, and fused MultiHeadAttention); the first and
  last convolutions (the graph's input and output); the time embedding and the cross-attentions' key and value
  projections of the prompt (every node not downstream of ``sample``); the residual shortcuts' 1x1 convolutions (their
  input, a concatenation of skip features of unlike scales, is the worst tensor for one per-tensor activation scale:
  measured in benchmarks/results/README.md);
- ``linear``: the transformer blocks' weighted MatMuls and Gemms (attention projections, feed-forward) are int8;
- ``linear+conv``: the other convolutions too (the resnets' 3x3s, proj_in/proj_out, up- and downsamplers).

Weights int8 per output channel, activations uint8 per tensor calibrated by MinMax (onnxruntime.quantization,
QDQ format), as onnxruntime documents for x86 with VNNI; AMX runs the same u8s8 products. The MinMax ranges are
measured by int8_calibration (the calibrator's own method, with one copy of the weights in memory instead of three).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

POLICIES = ("linear", "linear+conv")


def nodes_to_quantize(graph, policy: str) -> tuple[list[str], dict[str, int]]:
    """(the names of the nodes ``policy`` quantizes in ``graph`` (an onnx GraphProto), counts of what stays fp32 and why)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown int8 policy '{policy}' (one of {', '.join(POLICIES)})")
    constants = {init.name for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    main_path = _downstream(consumers, "sample")
    outputs = {value.name for value in graph.output}
    kept = {"time embedding and prompt K/V": 0, "first and last convolutions": 0, "residual shortcuts": 0, "attention scores": 0,
            "other convolutions": 0}
    chosen = []
    for node in graph.node:
        if node.op_type == "MatMul" and not (len(node.input) > 1 and node.input[1] in constants):
            kept["attention scores"] += 1  # two activations: QK^T or softmax x V
            continue
        if node.op_type not in ("Conv", "MatMul", "Gemm") or node.input[1] not in constants:
            continue
        if node.name not in main_path:
            kept["time embedding and prompt K/V"] += 1  # not downstream of sample: computed per call, cheap
        elif node.op_type == "Conv" and (node.input[0] == "sample" or node.output[0] in outputs):
            kept["first and last convolutions"] += 1
        elif node.op_type == "Conv" and _is_shortcut(node, producers.get(node.input[0])):
            kept["residual shortcuts"] += 1
        elif node.op_type != "Conv" or policy == "linear+conv":
            chosen.append(node.name)
        else:
            kept["other convolutions"] += 1
    kept["attention scores"] += sum(node.op_type == "MultiHeadAttention" for node in graph.node)
    return chosen, kept


def _downstream(consumers: dict, tensor: str) -> set[str]:
    """Names of the nodes that depend on ``tensor``."""
    seen, stack = set(), [tensor]
    while stack:
        for node in consumers[stack.pop()]:
            if node.name not in seen:
                seen.add(node.name)
                stack.extend(node.output)
    return seen


def _is_shortcut(node, producer) -> bool:
    """A resnet's 1x1 shortcut: its weight's name says so where the exporter kept it, else a 1x1 kernel fed by a Concat
    (``producer``: the node that makes its input)."""
    if "conv_shortcut" in node.input[1]:
        return True
    kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
    return kernel == [1, 1] and producer is not None and producer.op_type == "Concat"


def quantize_denoiser(source: Path, out: Path, calibration: Iterable[dict], policy: str, progress=print) -> dict:
    """Write ``out``: ``source`` (fp32 ONNX, weights beside it) with ``policy``'s nodes as QDQ int8, calibrated on the
    feeds of ``calibration`` (real sampler trajectories); returns the manifest's record of what was done."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from sdfast.export.int8_calibration import (activation_ranges, check_calibration_cache, graph_with_small_tensors,
                                                write_calibration_cache)

    check_calibration_cache()  # before minutes of calibration
    # symbolic shape inference knows the contrib ops (MultiHeadAttention), so the calibrator sees their outputs' types.
    # It runs on the graph with its small constants only: the weights stay in ``source``'s files, which the inferred
    # graph, written beside it, references (given the path, quant_pre_process loads them, copies the model and writes
    # them again: 3x the weights at once)
    inferred = source.with_name(out.stem + ".inferred.onnx")
    cache = out.with_name(out.stem + ".ranges.json")
    root = logging.getLogger()
    level = root.level
    try:
        quant_pre_process(graph_with_small_tensors(source), str(inferred), skip_optimization=True, skip_onnx_shape=True)
        graph = onnx.load(str(inferred), load_external_data=False).graph
        chosen, kept = nodes_to_quantize(graph, policy)
        del graph
        feeds = list(calibration)
        op_types = ["Conv", "MatMul", "Gemm"]
        progress(f"int8 ({policy}): {len(chosen)} nodes quantized, calibrating on {len(feeds)} U-Net calls")
        # the ranges with one copy of the weights in memory (int8_calibration), handed to quantize_static as its cache
        write_calibration_cache(activation_ranges(inferred, op_types, feeds, progress), cache)
        root.level = logging.ERROR  # onnxruntime's quantizer warns on the root logger; progress is ours
        quantize_static(str(inferred), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=chosen,
                        op_types_to_quantize=op_types, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=True, calibration_cache_path=cache, extra_options={"MatMulConstBOnly": True})
    finally:
        root.level = level
        cache.unlink(missing_ok=True)
        for leftover in inferred.parent.glob(inferred.name + "*"):
            leftover.unlink()
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "policy": policy, "quantized": len(chosen),
            "kept_fp32": kept, "weights": "int8 per output channel", "activations": "uint8 per tensor, MinMax",
            "calibration_calls": len(feeds)}
