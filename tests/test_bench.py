"""`sdfast bench`: the FLOP count against torch's, the schema and its renderings, backend skipping, the CPU peak."""
import csv
import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import run_cli
from sdfast.bench.hardware import CpuInfo, theoretical_peak
from sdfast.bench.report import CSV_COLUMNS, GPU_ONLY_METRICS, INT8_METRICS, METRICS, SCHEMA, BenchRun, Row, merge, render
from sdfast.bench.stats import Summary
from sdfast.errors import ConfigError

ICE_LAKE = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
cpu MHz\t\t: 2800.000
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni

"""
ZEN4 = ICE_LAKE.replace("GenuineIntel", "AuthenticAMD").replace("cpu family\t: 6", "cpu family\t: 25").replace(
    "Intel(R) Xeon(R) Processor @ 2.80GHz", "AMD EPYC 9R14").replace("cpu MHz\t\t: 2800.000", "cpu MHz\t\t: 3700.000").replace(
    "avx512_vnni", "avx512_vnni avx512_bf16")


# --- the FLOP count --------------------------------------------------------------------------------------------

def test_flops_of_each_op_follow_their_formula(tmp_path):
    """A hand-built graph: Conv 3x3, grouped Conv, ConvTranspose, batched MatMul and Gemm, each 2 x its MACs."""
    from sdfast.export.flops import count_flops

    def weight(name, *shape):
        return numpy_helper.from_array(np.zeros(shape, np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),  # [2, 8, 16, 16] -> [2, 16, 16, 16]
        helper.make_node("Conv", ["c1", "w2"], ["c2"], group=4, strides=[2, 2]),  # 1x1 grouped, stride 2 -> [2, 16, 8, 8]
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], strides=[2, 2]),  # -> [2, 4, 16, 16]
        helper.make_node("Reshape", ["c3", "shape"], ["r"]),  # -> [2, 64, 16]
        helper.make_node("MatMul", ["r", "m"], ["mm"]),  # [2, 64, 16] @ [16, 32]
        helper.make_node("Reshape", ["mm", "flat"], ["f"]),  # -> [128, 32]
        helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),  # [128, 32] @ [32, 10]^T
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight("w1", 16, 8, 3, 3), weight("w2", 16, 4, 1, 1), weight("w3", 16, 4, 2, 2), weight("m", 16, 32), weight("g", 10, 32),
         numpy_helper.from_array(np.array([2, 64, 16], np.int64), "shape"), numpy_helper.from_array(np.array([128, 32], np.int64), "flat")],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    expected = 2 * (
        2 * 16 * 16 * 16 * 8 * 9  # conv: every output x C_in x 3 x 3
        + 2 * 16 * 8 * 8 * 4  # grouped 1x1: every output x C_in/groups
        + 2 * 16 * 8 * 8 * 4 * 2 * 2  # transposed conv: every input pixel x C_out x 2 x 2
        + 2 * 64 * 32 * 16  # matmul: every output x K
        + 128 * 10 * 32  # gemm
    )
    assert count_flops(path, {"x": (2, 8, 16, 16)}) == expected
    with pytest.raises(ValueError, match="give a shape"):
        count_flops(path, {})


def test_exported_flops_match_torch_flop_counter(tiny_engine, tiny_model):
    """The manifest's per-call FLOPs equal torch.utils.flop_counter's on the same modules (attention as plain bmm)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sdfast.export.families.sd15 import WRAPPERS, load

    manifest = json.loads((tiny_engine / "manifest.json").read_text())
    model = load(tiny_model)
    for name, component in manifest["components"].items():
        flops = component["flops"]
        shapes = flops["input_shapes"]
        args = [torch.ones(shapes[s["name"]], dtype=torch.int64) if s["dtype"] == "int64" else torch.randn(shapes[s["name"]])
                for s in component["inputs"]]
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            WRAPPERS[name](model).eval()(*args)
        assert flops["per_call"] == counter.get_total_flops() > 0, name


# --- the schema ------------------------------------------------------------------------------------------------

def _run(cpu="cpu A", backends=("cpu", "torch"), model="tiny") -> BenchRun:
    run = BenchRun("2026-11-23T00:00:00+00:00", "sdfast bench", {"cpu": cpu, "cores": 2},
                   {"sdfast": "0.1.0"}, {"model": model, "height": 64, "width": 64, "batch": 1, "steps": 2, "repeat": 3, "precision": "fp32"})
    for i, backend in enumerate(backends):
        run.rows.append(Row(backend, "unet_step_cfg", 10.0 + i, 12.0, 9.0, 13.0, 3))
        run.rows.append(Row(backend, "load", 0.5))
    return run


def test_schema_round_trips_and_renders_every_format():
    run = _run()
    again = BenchRun.from_json(json.loads(render([run], "json")))
    assert again.to_json() == run.to_json() and again.to_json()["schema"] == SCHEMA
    rows = list(csv.DictReader(io.StringIO(render([run], "csv"))))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 4
    assert {(r["backend"], r["metric"], r["unit"]) for r in rows} >= {("cpu", "unet_step_cfg", "ms"), ("torch", "load", "s")}
    table = render([run], "table")
    assert "denoiser step (U-Net; SD3: transformer), with guidance" in table and "10.0 (9.0-13.0)" in table
    markdown = render([run], "md")
    assert markdown.splitlines()[0] == "| metric | unit | cpu | torch |"
    with pytest.raises(ValueError, match="unknown bench metric"):
        Row("cpu", "unet_speed", 1.0)
    with pytest.raises(ConfigError, match="not an sdfast bench result"):
        BenchRun.from_json({"rows": []})


def test_runs_of_two_machines_merge_side_by_side():
    merged = merge([_run("cpu A"), _run("cpu B", backends=("cuda",))])
    header = render(merged, "md").splitlines()[0]
    assert header == "| metric | unit | cpu @ cpu A | torch @ cpu A | cuda @ cpu B |"
    assert len(list(csv.DictReader(io.StringIO(render(merged, "csv"))))) == 6
    with pytest.raises(ConfigError, match="different workloads"):
        merge([_run(), _run(model="sd15")])


def test_summary_reports_median_p90_and_range():
    summary = Summary.of([5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0])
    assert (summary.median, summary.p90, summary.min, summary.max, summary.n) == (5.5, 9.0, 1.0, 10.0, 10)


# --- the CPU's limit -------------------------------------------------------------------------------------------

def test_peak_is_derived_from_cores_vector_width_fma_units_and_clock():
    ice_lake = CpuInfo.detect(ICE_LAKE)
    assert (ice_lake.ghz, ice_lake.family, ice_lake.model) == (2.8, 6, 106)
    peak = theoretical_peak(ice_lake.__class__(**{**ice_lake.__dict__, "cores": 2}))
    assert peak.fp32_gflops == pytest.approx(2 * 2.8 * 2 * 16 * 2)
    assert peak.bf16_gflops is None and peak.int8_gops == pytest.approx(4 * peak.fp32_gflops)
    assert "2 cores x 2.80 GHz x 2 FMA/cycle x 16 fp32 lanes (AVX-512)" in peak.derivation
    zen4 = CpuInfo.detect(ZEN4)
    zen4_peak = theoretical_peak(zen4.__class__(**{**zen4.__dict__, "cores": 2}))
    assert zen4_peak.fp32_gflops == pytest.approx(2 * 3.7 * 1 * 16 * 2) and zen4_peak.bf16_gflops == pytest.approx(2 * zen4_peak.fp32_gflops)


# --- the command -----------------------------------------------------------------------------------------------

def test_bench_measures_available_backends_and_says_why_others_are_skipped(tiny_engine, tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    done = run_cli("bench", tiny_engine, "--backends", "cpu,cuda,tensorrt,torch", "--repeat", "2", "--steps", "2",
                   "--format", "csv", "--out", out, "--plot", plot)
    assert done.returncode == 0, done.stderr
    (run,) = BenchRun.load(out)
    skipped = {s["backend"]: s["reason"] for s in run.skipped}
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "CUDAExecutionProvider" in skipped["cuda"] and "skipping cuda" in done.stderr
    pytest.importorskip("torch")
    measured = {r.backend for r in run.rows}
    assert {"cpu", "torch"} <= measured
    for backend in ("cpu", "torch"):
        for metric in ("load", "text_encoder", "unet_step_cfg", "vae_decode", "vae_encode", "end_to_end", "host_overhead_per_step",
                       "unet_gflops", "unet_peak_fraction", "peak_rss"):
            row = run.value(backend, metric)
            assert row is not None and np.isfinite(row.median), (backend, metric)
        for metric in ("unet_step_cfg", "vae_decode"):
            row = run.value(backend, metric)
            assert row.n == 2 and row.min <= row.median <= row.max and row.median > 0
    assert run.value("torch", "unet_step") is not None  # diffusers runs the unguided batch too
    flops = json.loads((tiny_engine / "manifest.json").read_text())["components"]["unet"]["flops"]["per_call"]
    cpu = run.value("cpu", "unet_gflops")
    assert cpu.median == pytest.approx(flops / (run.value("cpu", "unet_step_cfg").median / 1e3) / 1e9)
    assert run.machine["peak"]["fp32_gflops"] > 0 and run.machine["sgemm_gflops"] > 0
    ceiling = run.machine["fma_ceiling_gflops"]  # this machine kind has a C compiler and AVX-512 or AVX2
    assert 0 < ceiling <= run.machine["peak"]["fp32_gflops"] * 1.5, run.machine["fma_ceiling_how"]
    assert run.value("cpu", "unet_ceiling_fraction").median == pytest.approx(100 * cpu.median / ceiling)
    assert run.value("torch", "unet_ceiling_fraction") is None  # diffusers is not measured against it
    stages = {stage: run.value("cpu", f"peak_rss_{stage}").median for stage in ("load", "text_encoder", "unet", "vae_decode", "end_to_end")}
    assert all(0 < mib <= run.value("cpu", "peak_rss").median for mib in stages.values()), stages
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = list(csv.DictReader(io.StringIO(done.stdout)))
    assert {line["metric"] for line in lines} >= set(METRICS) - {"unet_step", *GPU_ONLY_METRICS, *INT8_METRICS}


@pytest.mark.parametrize("args, message", [
    (["--backends", "cpu,quantum"], "unknown backend 'quantum'"),
    (["--height", "128"], "built for height 64, not 128"),
    (["--repeat", "0"], "--repeat and --steps must be at least 1"),
])
def test_bench_refuses_bad_requests_in_one_line(tiny_engine, args, message):
    done = run_cli("bench", tiny_engine, *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_bench_merge_refuses_a_file_that_is_not_a_result(tmp_path):
    bogus = tmp_path / "other.json"
    bogus.write_text('{"hello": 1}')
    done = run_cli("bench", "--merge", bogus)
    assert done.returncode == 2 and "is not an sdfast bench result" in done.stderr


def test_bench_modules_import_no_heavy_library():
    """The CPU/CUDA measurements run on the lean runtime; only the 'torch' backend and --model exports import torch."""
    import subprocess
    import sys

    code = ("import sys, sdfast.bench.measure, sdfast.bench.report, sdfast.bench.hardware, sdfast.bench.engines, sdfast.cli.bench\n"
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    modules = set(eval(done.stdout.strip().splitlines()[-1]))
    assert not modules & {"torch", "diffusers", "transformers", "onnx", "matplotlib"}, modules & {"torch", "diffusers", "transformers", "onnx"}


def test_hyperthreads_of_one_core_count_once():
    """Two logical CPUs on one physical core share its FMA units: the peak counts the core once."""
    import os

    usable = sorted(os.sched_getaffinity(0))[:2]
    if len(usable) < 2:
        pytest.skip("needs two usable CPUs")
    block = ICE_LAKE.strip() + "\nphysical id\t: 0\ncore id\t\t: 0\n"
    siblings = "\n\n".join(block.replace("processor\t: 0", f"processor\t: {cpu}") for cpu in usable) + "\n\n"
    assert CpuInfo.detect(siblings).cores == 1
    two_cores = "\n\n".join(block.replace("processor\t: 0", f"processor\t: {cpu}").replace("core id\t\t: 0", f"core id\t\t: {i}")
                            for i, cpu in enumerate(usable)) + "\n\n"
    assert CpuInfo.detect(two_cores).cores == 2


def test_peak_rss_is_the_measuring_process_own():
    """A measuring child's peak must not carry its parent's (Linux keeps ru_maxrss across fork and exec)."""
    import subprocess
    import sys

    ballast = np.ones(600 << 20, dtype=np.uint8)  # 600 MiB resident in this, the parent, process
    child = subprocess.run([sys.executable, "-c", "from sdfast.bench.measure import peak_rss_mib; print(peak_rss_mib())"],
                           capture_output=True, text=True, timeout=120)
    del ballast
    assert child.returncode == 0, child.stderr
    assert 10 < float(child.stdout) < 400


def test_gpu_peaks_match_the_most_specific_name():
    """nvidia-smi's names: the PCIe H100 is not the SXM one, an L40S is not an L4, an A10G is not an A10."""
    from sdfast.bench.hardware import gpu_fp16_peak_tflops

    expected = {"NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA L40S": 362.05, "NVIDIA L40": 181.05,
                "NVIDIA L4": 121.0, "NVIDIA A10G": 70.0, "NVIDIA A10": 125.0, "NVIDIA A100-SXM4-80GB": 312.0,
                "Tesla T4": None, None: None}
    assert {name: gpu_fp16_peak_tflops(name) for name in expected} == expected
