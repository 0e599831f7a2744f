"""The CPU variant's graph rewrites (Winograd convolutions, fused attention) compute what the original graph does."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdfast.export.attention import fuse_attention
from sdfast.export.winograd import rewrite_convolutions


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("bias", [True, False])
def test_winograd_convolution_matches_the_direct_one(bias):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")] + ([numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "b")] if bias else [])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["c", "w2"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])],  # stride 2: left alone
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits + [numpy_helper.from_array(rng.standard_normal((8, 24, 3, 3)).astype(np.float32), "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((2, 16, 20, 20)).astype(np.float32)
    expected = _run(model, {"x": x})
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    rewritten, count = rewrite_convolutions(onnx.ModelProto.FromString(model.SerializeToString()), weights, min_tiles=4)
    assert count == 1 and "w" not in {init.name for init in rewritten.graph.initializer}
    got = _run(rewritten, {"x": x})
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    _, none = rewrite_convolutions(onnx.ModelProto.FromString(model.SerializeToString()), weights, min_tiles=101)  # 10x10 tiles < 101
    assert none == 0


def test_cpu_rewrite_streams_weights_from_and_to_external_data(tmp_path, monkeypatch):
    """rewrite_for_cpu on a graph whose weights are external (as SDXL's 10 GB U-Net): the untouched weight stays in the
    raw data file, the Winograd weight goes to the variant's own, the graph file holds no weights, and the result
    computes what the original does."""
    from sdfast.export import onnx_export

    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),  # rewritten
         helper.make_node("Conv", ["c", "w2"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])],  # stride 2: left alone
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
         for name, shape in (("w", (24, 16, 3, 3)), ("b", (24,)), ("w2", (8, 24, 3, 3)))],
    )
    raw = tmp_path / "unet.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(raw),
              save_as_external_data=True, location="unet.onnx.data", size_threshold=64)
    monkeypatch.setattr(onnx_export, "WINOGRAD_MIN_TILES", 4)
    out = tmp_path / "unet.cpu.onnx"
    assert onnx_export.rewrite_for_cpu(raw, out)["winograd_f2x2_3x3"] == 1
    rewritten = onnx.load(str(out), load_external_data=False)
    locations = {init.name: {e.key: e.value for e in init.external_data}.get("location") for init in rewritten.graph.initializer}
    assert locations["w2"] == "unet.onnx.data" and locations["wino0_u"] == "unet.cpu.onnx.data" and "w" not in locations
    assert out.stat().st_size < 16 * 1024 and (tmp_path / "unet.cpu.onnx.data").stat().st_size >= 16 * 24 * 16 * 4
    x = rng.standard_normal((1, 16, 20, 20)).astype(np.float32)
    expected = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def _attention_graph(batch=2, seq=24, ctx=7, heads=4, dim=8, shared_scale=True) -> onnx.ModelProto:
    """Attention as torch.onnx exports scaled_dot_product_attention: both sides scaled by scale ** 0.5."""
    width = heads * dim
    c = lambda name, value: numpy_helper.from_array(np.array(value, dtype=np.int64), name)  # noqa: E731
    s = float(dim ** -0.25)
    nodes = [
        helper.make_node("Reshape", ["q", "split_q"], ["q4"]), helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k", "split_k"], ["k4"]), helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["v", "split_k"], ["v4"]), helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["kt", "flat_k"], ["k3"]), helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["k3t", "kT_shape"], ["kT"]),
        helper.make_node("Mul", ["qt", "scale"], ["qs"]), helper.make_node("Mul", ["kT", "scale"], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]), helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vt"], ["o4"]), helper.make_node("Transpose", ["o4"], ["o"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o", "merge"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [batch, seq, width]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [batch, ctx, width]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [batch, ctx, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [c("split_q", [batch, seq, heads, dim]), c("split_k", [batch, ctx, heads, dim]), c("flat_k", [batch * heads, ctx, dim]),
         c("kT_shape", [batch, heads, dim, ctx]), c("merge", [batch, seq, width]),
         numpy_helper.from_array(np.array(s, dtype=np.float32), "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_fused_attention_matches_the_exported_pattern():
    model = _attention_graph()
    rng = np.random.default_rng(1)
    feeds = {"q": rng.standard_normal((2, 24, 32), dtype=np.float32), "k": rng.standard_normal((2, 7, 32), dtype=np.float32),
             "v": rng.standard_normal((2, 7, 32), dtype=np.float32)}
    expected = _run(model, feeds)
    fused, count = fuse_attention(onnx.ModelProto.FromString(model.SerializeToString()))
    assert count == 1 and [n.op_type for n in fused.graph.node] == ["MultiHeadAttention"]
    got = _run(fused, feeds)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_attention_whose_scores_are_used_elsewhere_is_left_alone():
    model = _attention_graph()
    model.graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))  # the scores leave the graph
    _, count = fuse_attention(model)
    assert count == 0


def test_cpu_variant_with_both_rewrites_passes_the_export_parity_check(tiny_model, tmp_path, monkeypatch):
    """On tiny the maps are too small for Winograd by default; lowered, every rewrite runs and the parity check holds."""
    import json

    from sdfast.export import onnx_export
    from sdfast.export.build import ExportRequest, export_engine
    from sdfast.runtime.backends import get_backend
    from sdfast.runtime.manifest import read_manifest

    monkeypatch.setattr(onnx_export, "WINOGRAD_MIN_TILES", 4)
    out = export_engine(ExportRequest(model=str(tiny_model), out=tmp_path / "engine"))
    unet = json.loads((out / "manifest.json").read_text())["components"]["unet"]
    variant = unet["variants"]["cpu"]
    assert variant["optimization"]["rewrites"]["winograd_f2x2_3x3"] > 0 and variant["optimization"]["rewrites"]["fused_attention"] > 0
    assert variant["parity"]["max_rel"] <= 1e-4 and unet["parity"]["max_rel"] <= 1e-4
    manifest = read_manifest(out)
    info = manifest.components["unet"]
    rng = np.random.default_rng(0)
    feeds = {s.name: rng.standard_normal(tuple(77 if isinstance(d, str) else d for d in s.shape)).astype(np.float32) for s in info.inputs}
    cpu = get_backend("cpu")
    rewritten = cpu.load(info, manifest.path(info.file)).run(feeds)[0]
    portable = cpu.load(type(info)(**{**info.__dict__, "variants": {}}), manifest.path(info.file)).run(feeds)[0]
    # the backend ran the rewritten variant, not the portable file a second time
    saved = ort.InferenceSession(str(out / variant["file"]), cpu.session_options(optimize=False), providers=["CPUExecutionProvider"])
    assert np.array_equal(rewritten, saved.run(None, feeds)[0]) and not np.array_equal(rewritten, portable)
    assert np.abs(rewritten - portable).max() <= 1e-4 * np.abs(portable).max()
