"""Selective static int8 (sdfast.export.int8_policy) on the tiny U-Net: what each policy quantizes, what stays fp32,
and the quantized graph's output against the fp32 graph's on sampler trajectories it was not calibrated on."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdfast.export.int8_export import record_trajectories
from sdfast.export.int8_policy import nodes_to_quantize, quantize_denoiser
from sdfast.runtime.generation import GenerationRequest
from sdfast.runtime.pipeline import Pipeline
from tests.conftest import run_cli


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
    return record_trajectories(Pipeline.load(engine, verify="size"), ("a red apple",), seeds, steps=3)


def copied_unet(engine: Path, folder: Path) -> Path:
    """``engine``'s fp32 U-Net graph and its data copied into ``folder`` (the quantizer writes beside it); its path."""
    entry = json.loads((engine / "manifest.json").read_text())["components"]["unet"]
    for name in entry["files"]:
        shutil.copy(engine / name, folder / name)
    return folder / entry["file"]


def counted_calls(pipeline, names: tuple[str, ...]) -> dict[str, int]:
    """{component: calls}, counted from now on, of ``pipeline``'s engines named."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        engine, run = pipeline.engines[name], pipeline.engines[name].run
        engine.run = lambda feeds, run=run, name=name: (calls.__setitem__(name, calls[name] + 1), run(feeds))[1]
    return calls


@pytest.mark.parametrize("policy, bound", [("linear", 0.05), ("linear+conv", 0.3)])
def test_quantized_unet_follows_the_fp32_graph_on_unseen_trajectories(tiny_engine, tmp_path, policy, bound):
    source = copied_unet(tiny_engine, tmp_path)
    record = quantize_denoiser(source, tmp_path / "unet.int8.onnx", recorded_feeds(tiny_engine, range(2)), policy, progress=lambda _: None)
    assert record["policy"] == policy and record["calibration_calls"] == 6 and record["quantized"] > 0
    graph = onnx.load(str(tmp_path / "unet.int8.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= record["quantized"] // 2  # QDQ around them
    assert not list(tmp_path.glob("*.inferred.*")) and not list(tmp_path.glob("*.ranges*"))  # the pre-processed copy, the ranges
    fp32 = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(tmp_path / "unet.int8.onnx"), providers=["CPUExecutionProvider"])
    errors = []
    for feeds in recorded_feeds(tiny_engine, range(5, 7)):  # seeds the calibration never saw
        expected, got = fp32.run(None, feeds)[0], int8.run(None, feeds)[0]
        errors.append(float(np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2))))
    assert 0 < max(errors) < bound, errors  # quantized (not bit-equal), and close: relative RMS error of the noise prediction


def test_quantize_reads_every_tensor_from_the_source_folder_whatever_the_working_folder(tiny_engine, tmp_path):
    # every initializer in the data file, as sd15's GroupNorm affines ([320, 1, 1], over the 1 KiB inline threshold)
    # are: shape inference must read them beside the graph, not from the working folder; the output goes elsewhere
    manifest = json.loads((tiny_engine / "manifest.json").read_text())
    source = tmp_path / "source" / "unet.onnx"
    source.parent.mkdir()
    model = onnx.load(str(tiny_engine / manifest["components"]["unet"]["file"]))
    onnx.save(model, str(source), save_as_external_data=True, location="unet.onnx.data", size_threshold=0)
    out = tmp_path / "out" / "unet.int8.onnx"
    out.parent.mkdir()
    record = quantize_denoiser(source, out, recorded_feeds(tiny_engine, range(1)), "linear+conv", progress=lambda _: None)
    assert record["quantized"] > 0 and out.is_file()
    assert sorted(p.name for p in source.parent.iterdir()) == ["unet.onnx", "unet.onnx.data"]  # nothing left beside it
    assert not list(out.parent.glob("*.ranges*"))
    int8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = recorded_feeds(tiny_engine, range(5, 6))[0]
    assert np.isfinite(int8.run(None, feeds)[0]).all()


def test_activation_ranges_are_onnxruntimes_minmax_over_every_calibration_call(tiny_engine, tmp_path):
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from sdfast.export.int8_calibration import activation_ranges

    inferred = tmp_path / "inferred.onnx"
    quant_pre_process(str(copied_unet(tiny_engine, tmp_path)), str(inferred), skip_optimization=True,
                      skip_onnx_shape=True, save_as_external_data=True, external_data_location="inferred.onnx.data")
    feeds = recorded_feeds(tiny_engine, range(2))
    ours = activation_ranges(inferred, ["Conv", "MatMul", "Gemm"], feeds)
    calibrator = create_calibrator(inferred, ["Conv", "MatMul", "Gemm"], augmented_model_path=str(tmp_path / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)

    class Reader:
        remaining = iter(feeds)

        def get_next(self):
            return next(self.remaining, None)

    calibrator.collect_data(Reader())  # every call kept (no CalibMaxIntermediateOutputs): the reference
    theirs = calibrator.compute_data()
    assert len(ours) > 50 and set(ours) == set(theirs.keys())
    for tensor, (low, high) in ours.items():
        assert low.shape == (1,) and low.dtype == np.float32 and low[0] < high[0]
        np.testing.assert_array_equal(np.stack([low, high]), np.stack(theirs[tensor].range_value), err_msg=tensor)
    assert not list(tmp_path.glob("inferred.ranges*"))  # the augmented graph is removed


@pytest.fixture(scope="module")
def int8_engine(tiny_engine, tmp_path_factory) -> Path:
    """A copy of the tiny engine dir with `sdfast quantize`'s int8 U-Net (3-step calibration runs)."""
    engine = tmp_path_factory.mktemp("int8") / "engine"
    shutil.copytree(tiny_engine, engine)
    result = run_cli("quantize", str(engine), "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert "unet_int8 (linear+conv" in result.stdout and "relative RMS error" in result.stdout
    return engine


def test_quantize_adds_a_verified_int8_component(int8_engine):
    manifest = json.loads((int8_engine / "manifest.json").read_text())
    entry = manifest["components"]["unet_int8"]
    assert entry["role"] == "denoiser_int8" and entry["precision"] == "int8" and entry["optional"]
    assert entry["int8"]["policy"] == "linear+conv" and entry["int8"]["calibration_calls"] == 12  # 4 prompts x 3 steps
    assert 0 < entry["int8"]["error_vs_fp32"]["relative_rms_median"] < 0.3
    assert entry["inputs"] == manifest["components"]["unet"]["inputs"]
    assert entry["variants"]["cpu"]["optimization"]["isa"] and entry["file"] != entry["variants"]["cpu"]["file"]
    assert not [p for p in int8_engine.iterdir() if p.name.startswith(".int8-")]  # no staging folder left
    checked = run_cli("info", str(int8_engine), "--verify")  # every file, the new ones included, against its sha256
    assert checked.returncode == 0, checked.stderr


def test_bench_times_the_int8_unet_against_the_measured_int8_ceiling(int8_engine, tmp_path):
    from sdfast.bench.report import BenchRun, render

    out = tmp_path / "bench.json"
    done = run_cli("bench", str(int8_engine), "--backends", "cpu", "--repeat", "2", "--steps", "1", "--format", "json", "--out", out)
    assert done.returncode == 0, done.stderr
    (run,) = BenchRun.load(out)
    int8_ceiling, fma_ceiling = run.machine["int8_ceiling_gops"], run.machine["fma_ceiling_gflops"]
    if int8_ceiling is None:  # no VNNI (or no C compiler): the int8 U-Net is still timed, its share is not given
        assert run.value("cpu", "unet_int8_ceiling_fraction") is None and run.value("cpu", "unet_step_int8") is not None
        pytest.skip(f"no int8 ceiling on this CPU: {run.machine['int8_ceiling_how']}")
    assert int8_ceiling > fma_ceiling > 0, run.machine["int8_ceiling_how"]  # 4 products a lane where an FMA does 1
    step = run.value("cpu", "unet_step_int8")
    assert step.n == 2 and step.median > 0
    flops = json.loads((int8_engine / "manifest.json").read_text())["components"]["unet"]["flops"]["per_call"]
    gops = run.value("cpu", "unet_int8_gops").median
    assert gops == pytest.approx(flops / (step.median / 1e3) / 1e9)
    assert run.value("cpu", "unet_int8_ceiling_fraction").median == pytest.approx(100 * gops / int8_ceiling)
    table = render([run], "md")
    assert "measured int8 ceiling" in table and "int8 U-Net share of the measured int8 ceiling" in table


def test_the_portable_qdq_graph_computes_what_the_cpu_variant_does(int8_engine):
    """Another onnxruntime version or vector ISA loads the QDQ graph instead of the CPU variant: the same quantized model."""
    entry = json.loads((int8_engine / "manifest.json").read_text())["components"]["unet_int8"]
    sessions = [ort.InferenceSession(str(int8_engine / file), providers=["CPUExecutionProvider"])
                for file in (entry["file"], entry["variants"]["cpu"]["file"])]
    feeds = recorded_feeds(int8_engine, range(9, 10))[1]
    portable, variant = (s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})[0] for s in sessions)
    assert np.sqrt(np.mean((portable - variant) ** 2) / np.mean(variant ** 2)) < 1e-2


def test_quantize_cli_offers_the_library_policies():
    from sdfast.cli.quantize import POLICIES as offered
    from sdfast.export.int8_policy import POLICIES

    assert set(offered) == set(POLICIES)


def test_generate_int8_writes_its_png_named_in_the_infotext(int8_engine, tmp_path):
    from PIL import Image

    from sdfast.runtime.images import psnr

    exact, int8 = tmp_path / "exact.png", tmp_path / "int8.png"
    for path, extra in ((exact, ()), (int8, ("--int8",))):
        result = run_cli("generate", str(int8_engine), "a red apple", "--steps", "4", "--seed", "3", "-o", str(path), *extra)
        assert result.returncode == 0, result.stderr
    assert "U-Net: int8 linear+conv" in Image.open(int8).info["parameters"]
    assert "U-Net:" not in Image.open(exact).info["parameters"]
    difference = psnr(np.array(Image.open(int8)), np.array(Image.open(exact)))
    assert 18 < difference < 60, difference  # quantized, so not the exact image; close to it


def test_int8_with_a_lora_is_refused(int8_engine):
    from sdfast.errors import RequestError

    with pytest.raises(RequestError, match="the int8 U-Net does not run with LoRAs"):
        Pipeline.load(int8_engine, verify="size").validate(GenerationRequest("a cat <lora:style:0.5>", steps=4, int8=True))


@pytest.mark.parametrize("fields, backend, message", [
    ({"step_cache": 3}, "cpu", "no int8 shallow U-Net for step caching: run sdfast quantize again on it"),
    ({"guidance_stop": 0.5}, "cpu", "with guidance truncation"),
    ({"refiner_switch": 0.8}, "cpu", "with a refiner hand-off"),
    ({}, "cuda", "with the cuda backend"),
])
def test_int8_combinations_not_run_yet_are_refused(fields, backend, message):
    from types import SimpleNamespace

    from sdfast.errors import RequestError
    from sdfast.runtime.int8_unet import INT8, SHALLOW_INT8, check_request

    manifest = SimpleNamespace(components={INT8: object()})  # no shallow int8 U-Net
    check_request(GenerationRequest("a red apple", int8=True), manifest, "cpu")  # alone: accepted
    with pytest.raises(RequestError, match=message):
        check_request(GenerationRequest("a red apple", int8=True, **fields), manifest, backend)
    with_shallow = SimpleNamespace(components={INT8: object(), SHALLOW_INT8: object()})
    check_request(GenerationRequest("a red apple", int8=True, step_cache=3), with_shallow, "cpu")  # both int8 graphs: accepted


def test_int8_needs_the_component_and_quantize_needs_an_fp32_single_size_engine(tiny_engine, tiny_sized_engine, tmp_path):
    result = run_cli("generate", str(tiny_engine), "a red apple", "--int8", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "no int8 U-Net: add it with sdfast quantize" in result.stderr
    for engine, message in ((tiny_sized_engine, "one size"), (tmp_path / "missing", "not an engine dir")):
        result = run_cli("quantize", str(engine))
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cached_step_feeds_pair_each_call_with_the_feature_of_the_call_before_in_its_trajectory():
    from sdfast.errors import ExportError
    from sdfast.export.int8_export import cached_step_feeds

    feeds = [{"sample": np.full(1, call), "timestep": np.full(1, 10 - call), "unused": None} for call in range(6)]
    features = [np.full(1, 100 + call) for call in range(6)]
    paired = cached_step_feeds(feeds, features, steps=3, inputs=["sample", "timestep"])  # two trajectories of 3 calls
    assert [(int(f["sample"][0]), int(f["step_cache_feature"][0])) for f in paired] == [(1, 100), (2, 101), (4, 103), (5, 104)]
    assert set(paired[0]) == {"sample", "timestep", "step_cache_feature"}
    with pytest.raises(ExportError, match="not whole trajectories of 4 steps"):
        cached_step_feeds(feeds, features, steps=4, inputs=["sample"])


@pytest.fixture(scope="module")
def int8_step_cache_engine(tiny_model, tmp_path_factory) -> Path:
    """The tiny model exported with step caching (and guidance truncation's cond-only U-Net) at one size, then quantized:
    both int8 U-Nets (3-step calibration)."""
    from sdfast.export.build import ExportRequest, export_engine

    engine = export_engine(ExportRequest(model="tiny", out=tmp_path_factory.mktemp("int8-cache") / "engine", step_cache=True,
                                         guidance_truncation=True))
    result = run_cli("quantize", str(engine), "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert "unet_shallow_int8 (" in result.stdout and "--step-cache N runs both" in result.stdout
    return engine


def test_quantize_adds_an_int8_shallow_unet_calibrated_on_cached_steps(int8_step_cache_engine):
    components = json.loads((int8_step_cache_engine / "manifest.json").read_text())["components"]
    full, shallow = components["unet_int8"], components["unet_shallow_int8"]
    assert shallow["role"] == "denoiser_shallow_int8" and shallow["precision"] == "int8" and shallow["optional"]
    assert shallow["inputs"] == components["unet_shallow"]["inputs"] and "step_cache_feature" in [i["name"] for i in shallow["inputs"]]
    assert [o["name"] for o in full["outputs"]] == ["noise_pred", "step_cache_feature"]  # the full int8 U-Net feeds the cache
    assert shallow["int8"]["calibration_calls"] == 8  # 4 prompts x the 2 cached steps of 3
    assert shallow["int8"]["quantized"] > 0 and 0 < shallow["int8"]["error_vs_fp32"]["relative_rms_median"] < 0.3
    checked = run_cli("info", str(int8_step_cache_engine), "--verify")
    assert checked.returncode == 0, checked.stderr


def test_int8_with_step_caching_runs_the_int8_shallow_unet_on_the_cached_steps(int8_step_cache_engine):
    from sdfast.runtime.images import psnr

    pipeline = Pipeline.load(int8_step_cache_engine, verify="size")
    calls = counted_calls(pipeline, ("unet", "unet_shallow", "unet_int8", "unet_shallow_int8"))
    request = GenerationRequest("a red apple", steps=6, seed=3, step_cache=2)
    cached = pipeline.generate(request)
    assert calls == {"unet": 3, "unet_shallow": 3, "unet_int8": 0, "unet_shallow_int8": 0}
    both = pipeline.generate(dataclasses.replace(request, int8=True))
    assert calls == {"unet": 3, "unet_shallow": 3, "unet_int8": 3, "unet_shallow_int8": 3}
    assert "U-Net: int8 linear+conv" in both.parameters[0] and "Step cache: DeepCache every 2" in both.parameters[0]
    assert 18 < psnr(both.images[0], cached.images[0]) < 60  # quantized, so not the fp32 step-cached image; close to it


def test_int8_without_guidance_keeps_the_int8_unet_rather_than_the_fp32_cond_only_one(int8_step_cache_engine):
    pipeline = Pipeline.load(int8_step_cache_engine, verify="size")
    calls = counted_calls(pipeline, ("unet", "unet_cond", "unet_int8"))
    request = GenerationRequest("a red apple", steps=4, seed=3, cfg_scale=1.0)
    pipeline.generate(request)  # cfg 1 on an engine with guidance truncation: the fp32 cond-only U-Net, batch 1
    assert calls == {"unet": 0, "unet_cond": 4, "unet_int8": 0}
    quantized = pipeline.generate(dataclasses.replace(request, int8=True))
    assert calls == {"unet": 0, "unet_cond": 4, "unet_int8": 4}  # the int8 U-Net the infotext names, not the fp32 one
    assert "U-Net: int8 linear+conv" in quantized.parameters[0]


def test_a1111_clients_ask_for_the_int8_unet_by_the_sdfast_int8_option(int8_engine):
    """override_settings (per request) or /sdapi/v1/options (every request) with sdfast_int8, through the real webuiapi."""
    import httpx
    import webuiapi

    from tests.test_serve import Server

    pipeline = Pipeline.load(int8_engine, verify="size")
    request = GenerationRequest("a boat", steps=3, seed=5, sampler="euler", cfg_scale=7.5)
    expected = pipeline.generate(dataclasses.replace(request, int8=True)).images[0]
    server = Server(int8_engine)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        asked = dict(prompt="a boat", seed=5, steps=3, width=64, height=64, sampler_name="Euler", cfg_scale=7.5)
        result = api.txt2img(**asked, override_settings={"sdfast_int8": True})
        assert np.array_equal(np.asarray(result.image), expected) and "U-Net: int8 linear+conv" in result.info["infotexts"][0]
        plain = api.txt2img(**asked)
        assert np.array_equal(np.asarray(plain.image), pipeline.generate(request).images[0])
        assert "U-Net:" not in plain.info["infotexts"][0]
        api.set_options({"sdfast_int8": True})
        assert api.get_options()["sdfast_int8"] is True
        assert np.array_equal(np.asarray(api.txt2img(**asked).image), expected)
        bad = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"sdfast_int8": "yes"}})
        assert bad.status_code == 422 and bad.json()["field"] == "override_settings.sdfast_int8"
    finally:
        assert server.stop()


def test_a_component_written_as_none_leaves_the_manifest_with_its_files(int8_step_cache_engine, tmp_path):
    """add_to_engine's removal: what quantize does to an old int8 shallow U-Net its new U-Net does not come with."""
    from sdfast.export.engine_additions import add_to_engine
    from sdfast.runtime.manifest import read_manifest

    engine = tmp_path / "engine"
    shutil.copytree(int8_step_cache_engine, engine)
    old = json.loads((engine / "manifest.json").read_text())["components"]["unet_shallow_int8"]
    staging = tmp_path / "staging"
    staging.mkdir()
    add_to_engine(read_manifest(engine), {"unet_shallow_int8": None}, staging)
    components = json.loads((engine / "manifest.json").read_text())["components"]
    assert "unet_shallow_int8" not in components and "unet_int8" in components
    assert not [name for name in [*old["files"], *old["variants"]["cpu"]["files"]] if (engine / name).exists()]
    checked = run_cli("info", str(engine), "--verify")
    assert checked.returncode == 0, checked.stderr
