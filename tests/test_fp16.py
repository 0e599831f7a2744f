"""fp16 export: the converted graphs, the components kept fp32, parity, and the NaN guard on a real fp16 overflow."""
import json
import shutil
import tomllib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdfast.errors import EngineError
from sdfast.export.fp16 import convert_to_fp16
from sdfast.runtime.images import psnr
from sdfast.runtime.manifest import sha256_file
from sdfast.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import REPO, run_cli, visible_lines


def _initializer_types(path) -> set[int]:
    model = onnx.load(str(path))
    return {init.data_type for init in model.graph.initializer if len(init.dims) >= 2}  # weights, not shape constants


def test_fp16_manifest_and_graphs(tiny_fp16_engine):
    manifest = json.loads((tiny_fp16_engine / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    components = manifest["components"]
    for name in ("text_encoder", "unet"):
        entry = components[name]
        assert entry["precision"] == "fp16"
        assert entry["fp16"]["io_dtype"] == "float32" and entry["fp16"]["fp16_nodes"] > 0
        assert entry["parity"]["passed"] and 0 < entry["parity"]["max_rel"] <= entry["parity"]["tolerance_rel"] <= 2e-2
        assert entry["parity"]["max_rel"] > 1e-5, "fp16 rounding should be visible against the fp32 reference"
        assert _initializer_types(tiny_fp16_engine / entry["file"]) == {TensorProto.FLOAT16}
        session = ort.InferenceSession(str(tiny_fp16_engine / entry["file"]), providers=["CPUExecutionProvider"])
        assert {i.type for i in session.get_inputs() if i.name != "input_ids" and i.name != "clip_skip"} <= {"tensor(float)"}
        assert {o.type for o in session.get_outputs()} == {"tensor(float)"}
        cuda = entry["variants"]["cuda"]
        assert set(entry["variants"]) == {"cuda"}, "fp16 components get no CPU variant"
        assert (tiny_fp16_engine / cuda["file"]).is_file() and cuda["optimization"]["for"] == "CUDAExecutionProvider"
        assert cuda["parity"]["passed"]
    assert components["unet"]["variants"]["cuda"]["optimization"]["fusions"]["com.microsoft.MultiHeadAttention"] > 0
    recipe = tomllib.loads((REPO / "export" / f"{manifest['family']}.toml").read_text())["components"]
    for name in ("vae_decoder", "vae_encoder"):
        entry = components[name]
        assert entry["precision"] == "fp32", name
        assert entry["fp16"] == {"kept_fp32": "whole component", "why": recipe[name]["fp16_whole_fp32"]}, name
        assert entry["parity"]["tolerance_rel"] == 1e-4
        assert _initializer_types(tiny_fp16_engine / entry["file"]) == {TensorProto.FLOAT}


def test_block_list_keeps_ops_fp32(tiny_fp16_engine, tmp_path):
    """An op type on the recipe's list computes in fp32 between Casts, and the record counts it."""
    source = tmp_path / "unet32.onnx"
    weights = numpy_helper.from_array(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["s"], axis=-1),
             helper.make_node("MatMul", ["s", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(source))
    _, record = convert_to_fp16(source, tmp_path / "kept.onnx", ["Softmax"])
    assert record["kept_fp32_ops"] == {"Softmax": 1} and record["requested_fp32_ops"] == ["Softmax"]
    converted = onnx.load(str(tmp_path / "kept.onnx"))
    softmax = next(n for n in converted.graph.node if n.op_type == "Softmax")
    producer = next(n for n in converted.graph.node if softmax.input[0] in n.output)
    assert producer.op_type == "Cast" and helper.get_attribute_value(producer.attribute[0]) == TensorProto.FLOAT
    _, plain = convert_to_fp16(source, tmp_path / "plain.onnx", [])
    assert "Softmax" not in plain["kept_fp32_ops"]
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    expected = ort.InferenceSession(str(source)).run(None, {"x": x})[0]
    for name in ("kept.onnx", "plain.onnx"):
        got = ort.InferenceSession(str(tmp_path / name)).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=5e-3)


def test_converter_duplicate_casts_are_repaired(tmp_path):
    """A weight shared by fp16 and fp32 ops: onnxruntime's converter emits two identical Casts; the result must load."""
    weight, bias = numpy_helper.from_array(np.ones(8, np.float32), "w"), numpy_helper.from_array(np.zeros(8, np.float32), "b")
    nodes = [helper.make_node("LayerNormalization", ["x", "w", "b"], ["y1"]), helper.make_node("Mul", ["y1", "w"], ["m"]),
             helper.make_node("LayerNormalization", ["m", "w", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "ln.onnx"))
    _, record = convert_to_fp16(tmp_path / "ln.onnx", tmp_path / "ln16.onnx", ["LayerNormalization"])
    assert record["duplicate_casts_removed"] == 1
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    expected = ort.InferenceSession(str(tmp_path / "ln.onnx")).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "ln16.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-2)


def test_kept_ops_pass_fp32_between_them_and_fp16_only_where_a_converted_op_reads(tmp_path):
    """Nodes kept fp32 by the policy read each other's outputs, and fp32 graph inputs, in fp32 (no Cast round trip through
    fp16, where 1e5 is inf); a converted op beside them still gets its fp16 copy; every node follows its producers.
    Run by ONNX's reference evaluator, which computes in each tensor's own dtype (onnxruntime's CPU provider does not)."""
    from onnx.reference import ReferenceEvaluator

    shift, two = numpy_helper.from_array(np.array(-99000.0, np.float32), "shift"), numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("Add", ["x", "shift"], ["a"], name="add"), helper.make_node("Mul", ["a", "two"], ["m"], name="mul"),
             helper.make_node("Relu", ["a"], ["r"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [4]) for name in ("m", "r")], [shift, two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "kept.onnx"))
    _, record = convert_to_fp16(tmp_path / "kept.onnx", tmp_path / "kept16.onnx", ["Add", "Mul"])
    converted = onnx.load(str(tmp_path / "kept16.onnx"))
    by_name = {node.name: node for node in converted.graph.node}
    producer = {out: node for node in converted.graph.node for out in node.output}
    assert record["fp16_round_trips_removed"] == 2 and by_name["add"].input[0] == "x"  # the graph input, in fp32
    assert producer[by_name["mul"].input[0]] is by_name["add"]  # Add's fp32 output, straight
    relu_input = producer[by_name["relu"].input[0]]
    assert relu_input.op_type == "Cast" and producer[relu_input.input[0]] is by_name["add"]  # the converted Relu's fp16 copy
    produced = set()
    for node in converted.graph.node:  # ONNX's order: each node after its inputs' producers
        assert all(name in produced or name in ("x", "shift", "two") or not name for name in node.input), node.name
        produced.update(node.output)
    m, r = ReferenceEvaluator(converted).run(None, {"x": np.full(4, 1e5, np.float32)})
    np.testing.assert_array_equal(m, np.full(4, 2000.0, np.float32))
    np.testing.assert_array_equal(r, np.full(4, 1000.0, np.float32))


def test_fp16_image_is_close_to_fp32(tiny_engine, tiny_fp16_engine):
    request = GenerationRequest(prompt="a lighthouse at dusk", steps=6, seed=11, sampler="euler")
    ours = Pipeline.load(tiny_fp16_engine).generate(request)
    reference = Pipeline.load(tiny_engine).generate(request)
    assert ours.images.shape == reference.images.shape
    quality = psnr(ours.images, reference.images)
    assert 25 < quality < 100, quality  # close, and not the same engine twice


def _overflowing_copy(engine_dir, tmp_path):
    """The fp16 engine with one U-Net weight scaled past fp16's range: a real overflow in a real fp16 graph."""
    copy = tmp_path / "overflow"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["components"]["unet"]
    model = onnx.load(str(copy / entry["file"]))
    last_conv = [node for node in model.graph.node if node.op_type == "Conv"][-1]  # conv_out, which writes noise_pred
    weight = next(i for i in model.graph.initializer if i.name == last_conv.input[1])
    assert weight.data_type == TensorProto.FLOAT16
    values = numpy_helper.to_array(weight).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array((np.sign(values) * 60000.0 + values).astype(np.float16), weight.name))
    onnx.save(model, str(copy / entry["file"]))
    entry["files"][entry["file"]] = {"sha256": sha256_file(copy / entry["file"]), "bytes": (copy / entry["file"]).stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_nan_guard_names_the_stage(tiny_fp16_engine, tmp_path):
    broken = _overflowing_copy(tiny_fp16_engine, tmp_path)
    with pytest.raises(EngineError, match="U-Net produced NaN or inf"):
        Pipeline.load(broken).generate(GenerationRequest(prompt="x", steps=2))
    out = tmp_path / "black.png"
    result = run_cli("generate", broken, "x", "--steps", "2", "-o", out)
    assert result.returncode != 0 and "U-Net produced NaN or inf" in result.stderr
    assert "Traceback" not in result.stderr and len(visible_lines(result.stderr)) == 1
    assert not out.exists()


def test_every_file_is_as_readable_as_the_umask_allows(tiny_fp16_engine):
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in tiny_fp16_engine.rglob("*"):
        assert path.stat().st_mode & 0o777 == ((0o777 if path.is_dir() else 0o666) & ~umask), path


def _score_dtypes(path) -> dict[str, int]:
    """The element type each attention op computes in: the type of its output after shape inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    return {node.op_type + ("_scores" if node.op_type == "MatMul" else ""): types[node.output[0]]
            for node in model.graph.node if node.op_type == "Softmax" or (node.op_type == "MatMul" and "scores" in node.output[0])}


def test_fp32_attention_scores_keep_the_score_path_fp32(tmp_path):
    """SD 2.1's scores overflow fp16's 65504 (on a GPU; the CPU provider upcasts fp16 MatMul itself): with the policy,
    Q·Kᵀ, its scalings and the Softmax compute in fp32 and give the fp32 answer."""
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")  # torch's export scales Q and K by sqrt(1/sqrt(d))
    nodes = [helper.make_node("Mul", ["q", "scale"], ["qs"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
             helper.make_node("Mul", ["kt", "scale"], ["ks"]), helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 8]) for n in ("q", "k", "v")]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "attn.onnx"))
    _, plain = convert_to_fp16(tmp_path / "attn.onnx", tmp_path / "plain.onnx", [])
    _, record = convert_to_fp16(tmp_path / "attn.onnx", tmp_path / "upcast.onnx", [], "upcast_attention")
    assert record["fp32_attention_scores"] == {"nodes": 4, "why": "upcast_attention"}  # Softmax, Q·Kᵀ, 2 scalings
    assert record["fp16_round_trips_removed"] == 4  # 3 between the kept nodes, and q from the graph input to its scaling
    assert "fp32_attention_scores" not in plain
    assert _score_dtypes(tmp_path / "plain.onnx") == {"MatMul_scores": TensorProto.FLOAT16, "Softmax": TensorProto.FLOAT16}
    assert _score_dtypes(tmp_path / "upcast.onnx") == {"MatMul_scores": TensorProto.FLOAT, "Softmax": TensorProto.FLOAT}
    rng = np.random.default_rng(2)
    feeds = {"q": rng.uniform(150, 300, (4, 8)).astype(np.float32), "k": rng.uniform(150, 300, (4, 8)).astype(np.float32),
             "v": rng.standard_normal((4, 8)).astype(np.float32)}  # scores of 4e4 to 2e5: beyond fp16
    expected = ort.InferenceSession(str(tmp_path / "attn.onnx")).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "upcast.onnx")).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-2 * np.abs(expected).max())
