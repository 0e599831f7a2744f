"""Activation ranges for static int8, with one copy of the weights in memory.

onnxruntime's MinMax calibrator (``quantize_static`` with a data reader) holds the model it quantizes, a second copy
it augments, and a session on the augmented file: three copies of the weights at once, about 4x an fp32 U-Net's size
at the peak of ``sdfast quantize`` (14 GB for sd15), more than a 24 GiB machine has for SDXL. The ranges here are the
same ones, measured the same way (a ReduceMin and a ReduceMax on every fp32 input and output of the calibrated op
types, min of mins and max of maxes over the calls), from a session on the graph whose weights stay in their files
until the session maps them. ``quantize_static`` then reads them as its calibration cache and calibrates nothing.

It also measures every call. onnxruntime 1.31's calibrator, given ``CalibMaxIntermediateOutputs`` to bound its memory
(as sdfast did), drops each full batch of calls without computing its ranges (microsoft/onnxruntime#18893; the fix,
#20226, was closed unmerged): only the last ``calls % batch`` calls set the ranges, one of 40 for sd15.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from sdfast.errors import ExportError

SUFFIX = "_sdfast_range_"  # the added outputs: {tensor}{SUFFIX}min and {tensor}{SUFFIX}max


def graph_with_small_tensors(path: Path, below: int = 1 << 20):
    """``path``'s model with only its external tensors under ``below`` bytes loaded (the constants shape inference reads
    the values of, GroupNorm's [C, 1, 1] affines among them); the weights stay in their files, named relative to it."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor) and int({e.key: e.value for e in tensor.external_data}.get("length", below)) < below:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


def check_calibration_cache() -> None:
    """ExportError unless this onnxruntime's quantize_static reads a calibration cache (onnxruntime 1.31.1 does)."""
    import inspect

    import onnxruntime
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise ExportError("sdfast quantize needs an onnxruntime whose quantize_static reads a calibration cache (1.31.1 "
                          f"does); this is {onnxruntime.__version__}")


def tensors_to_calibrate(graph, op_types: Iterable[str]) -> list[str]:
    """The fp32, non-initializer inputs and outputs of ``op_types``' nodes: what onnxruntime's calibrator measures (it
    takes fp16 ones too; sdfast quantizes fp32 graphs only)."""
    from onnx import TensorProto

    typed = {info.name: info for info in itertools.chain(graph.value_info, graph.output, graph.input)}
    constants = {initializer.name for initializer in graph.initializer}
    wanted, found = set(op_types), {}
    for node in graph.node:
        if node.op_type not in wanted:
            continue
        for name in itertools.chain(node.input, node.output):
            info = typed.get(name)
            if (info is not None and name not in constants and info.type.HasField("tensor_type")
                    and info.type.tensor_type.elem_type == TensorProto.FLOAT):
                found[name] = None
    return list(found)


def activation_ranges(graph_path: Path, op_types: Iterable[str], feeds: list[dict[str, np.ndarray]],
                      progress: Callable[[str], None] = lambda _: None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tensor: (min, max)} over ``feeds`` for the tensors ``tensors_to_calibrate`` names, each a float32 array of one
    element as onnxruntime's MinMax calibrator gives it. ``graph_path``: a graph whose value_info types its tensors
    (quant_pre_process's symbolic shape inference); its weights (external data) are not loaded here. The augmented
    graph is written beside it for the session and removed after."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(graph_path), load_external_data=False)  # the graph alone: its initializers point into the files
    tensors = tensors_to_calibrate(model.graph, op_types)
    if not tensors:
        raise ExportError(f"{graph_path.name}: no typed tensor to calibrate (run shape inference on the graph first)")
    names = []  # the added outputs, [min, max] per tensor in order
    for tensor in tensors:
        for reduce in ("min", "max"):
            output = f"{tensor}{SUFFIX}{reduce}"
            names.append(output)
            # no axes and keepdims 0: one scalar over every element, as the calibrator's ReduceMin/ReduceMax then Reshape
            model.graph.node.append(helper.make_node(f"Reduce{reduce.title()}", [tensor], [output], keepdims=0,
                                                     name=output))
            model.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, []))
    augmented = graph_path.with_name(graph_path.stem + ".ranges.onnx")  # beside the weights its initializers name
    onnx.save(model, str(augmented))
    del model
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as named, unfused
        options.log_severity_level = 3
        session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
        inputs = [spec.name for spec in session.get_inputs()]
        lowest = np.full(len(tensors), np.inf, np.float32)
        highest = np.full(len(tensors), -np.inf, np.float32)
        calls = 0
        for feed in feeds:
            values = np.asarray(session.run(names, {name: feed[name] for name in inputs}), np.float32)  # [2T]
            lowest = np.fmin(lowest, values[0::2])  # fmin/fmax skip NaN, as the calibrator's nanmin/nanmax
            highest = np.fmax(highest, values[1::2])
            calls += 1
            if calls % 10 == 0 or calls == len(feeds):
                progress(f"int8: activation ranges of {len(tensors)} tensors, {calls}/{len(feeds)} calibration calls")
        del session
    finally:
        augmented.unlink(missing_ok=True)
    if not calls:
        raise ExportError("no calibration data: the activation ranges need at least one U-Net call")
    return {tensor: (lowest[i:i + 1], highest[i:i + 1]) for i, tensor in enumerate(tensors)}


def write_calibration_cache(ranges: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """``ranges`` as onnxruntime's calibration cache (MinMax), which ``quantize_static(calibration_cache_path=...)`` reads."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    data = TensorsData(CalibrationMethod.MinMax, {name: TensorData(lowest=low, highest=high) for name, (low, high) in ranges.items()})
    save_tensors_data(data, path)
    return path
