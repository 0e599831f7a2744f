"""Selective static int8 (sdfast.export.int8_policy) on the tiny U-Net: what each policy quantizes, what stays fp32,
and the quantized graph's output against the fp32 graph's on sampler trajectories it was not calibrated on."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdfast.export.int8_policy import nodes_to_quantize, quantize_denoiser
from sdfast.runtime.generation import GenerationRequest
from sdfast.runtime.pipeline import Pipeline


def unet_graph(engine: Path):
    manifest = json.loads((engine / "manifest.json").read_text())
    return onnx.load(str(engine / manifest["components"]["unet"]["file"]), load_external_data=False).graph


def test_linear_policy_quantizes_only_weighted_linear_layers_on_the_sample_path(tiny_engine):
    graph = unet_graph(tiny_engine)
    constants = {init.name for init in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    chosen, kept = nodes_to_quantize(graph, "linear")
    assert chosen, "the tiny U-Net's transformer blocks have linear layers"
    assert {by_name[name].op_type for name in chosen} <= {"MatMul", "Gemm"}
    assert all(by_name[name].input[1] in constants for name in chosen)  # never the scores (two activations)
    assert kept["attention scores"] > 0 and kept["time embedding and prompt K/V"] > 0 and kept["first and last convolutions"] == 2
    assert kept["other convolutions"] > 0
    time_linears = [n for n in graph.node if n.op_type == "Gemm" and "time_emb" in n.input[1]]
    assert time_linears and not {n.name for n in time_linears} & set(chosen)


def test_linear_conv_policy_adds_the_convolutions_but_not_the_ends_or_the_shortcuts(tiny_engine):
    graph = unet_graph(tiny_engine)
    by_name = {node.name: node for node in graph.node}
    linear, _ = nodes_to_quantize(graph, "linear")
    both, kept = nodes_to_quantize(graph, "linear+conv")
    convolutions = [by_name[name] for name in set(both) - set(linear)]
    assert convolutions and {n.op_type for n in convolutions} == {"Conv"}
    assert not any(n.input[0] == "sample" or "conv_shortcut" in n.input[1] for n in convolutions)
    assert kept["residual shortcuts"] == sum("conv_shortcut" in n.input[1] for n in graph.node if n.op_type == "Conv") > 0
    assert kept["other convolutions"] == 0


def test_unknown_policy_is_refused(tiny_engine):
    with pytest.raises(ValueError, match="unknown int8 policy 'all'"):
        nodes_to_quantize(unet_graph(tiny_engine), "all")


def recorded_feeds(engine: Path, seeds: range) -> list[dict]:
    """The U-Net feeds of the exact pipeline sampling 3 steps per seed."""
    pipeline = Pipeline.load(engine, verify="size")
    unet = pipeline.engines["unet"]
    feeds, run = [], unet.run
    unet.run = lambda f: (feeds.append({k: np.array(v) for k, v in f.items()}), run(f))[1]
    for seed in seeds:
        pipeline.generate(GenerationRequest("a red apple", "blurry", steps=3, seed=seed))
    return feeds


@pytest.mark.parametrize("policy, bound", [("linear", 0.05), ("linear+conv", 0.3)])
def test_quantized_unet_follows_the_fp32_graph_on_unseen_trajectories(tiny_engine, tmp_path, policy, bound):
    manifest = json.loads((tiny_engine / "manifest.json").read_text())
    for name in manifest["components"]["unet"]["files"]:
        shutil.copy(tiny_engine / name, tmp_path / name)
    source = tmp_path / manifest["components"]["unet"]["file"]
    record = quantize_denoiser(source, tmp_path / "unet.int8.onnx", recorded_feeds(tiny_engine, range(2)), policy, progress=lambda _: None)
    assert record["policy"] == policy and record["calibration_calls"] == 6 and record["quantized"] > 0
    graph = onnx.load(str(tmp_path / "unet.int8.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= record["quantized"] // 2  # QDQ around them
    assert not list(tmp_path.glob("*.inferred.*"))  # the pre-processed copy is removed
    fp32 = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(tmp_path / "unet.int8.onnx"), providers=["CPUExecutionProvider"])
    errors = []
    for feeds in recorded_feeds(tiny_engine, range(5, 7)):  # seeds the calibration never saw
        expected, got = fp32.run(None, feeds)[0], int8.run(None, feeds)[0]
        errors.append(float(np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2))))
    assert 0 < max(errors) < bound, errors  # quantized (not bit-equal), and close: relative RMS error of the noise prediction
