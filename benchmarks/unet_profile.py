"""Where a U-Net step's time goes on the CPU: onnxruntime's profiler, per op type, on the engine's CPU graph.

    python benchmarks/unet_profile.py ENGINE_DIR [--runs 3] [--component unet] [--out benchmarks/results/unet_profile_sd15_256.json]

Loads the component's graph as sdfast's CPU backend does (the pre-optimized CPU variant, optimizations off), runs one
warm-up and ``--runs`` profiled calls on the engine's shapes, and sums onnxruntime's per-node kernel times by op type
(median over the runs). Also prints the FLOPs the manifest counted, so the achieved GFLOP/s of the convolutions and
matrix products can be set against the FMA ceiling.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdfast.runtime.manifest import read_manifest  # noqa: E402

GROUPS = {  # op type -> what it is, for the summary
    "Conv": "convolution", "NchwcConv": "convolution", "FusedConv": "convolution",
    "MatMul": "matrix product", "FusedMatMul": "matrix product", "Gemm": "matrix product", "MatMulNBits": "matrix product",
    "MultiHeadAttention": "attention", "Attention": "attention", "Softmax": "attention",
    "GroupNorm": "normalization", "GroupNormalization": "normalization", "InstanceNormalization": "normalization",
    "LayerNormalization": "normalization", "SkipLayerNormalization": "normalization",
    "ReorderInput": "layout reorder", "ReorderOutput": "layout reorder", "Transpose": "layout reorder",
    "DepthToSpace": "layout reorder", "SpaceToDepth": "layout reorder", "Reshape": "layout reorder",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--component", default="unet")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--portable", action="store_true", help="profile the portable graph, optimized at load, instead")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import onnxruntime as ort

    manifest = read_manifest(args.engine)
    info = manifest.components[args.component]
    variant = info.variants.get("cpu") if not args.portable else None
    graph = manifest.path(variant["file"] if variant else info.file)
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in info.inputs:
        shape = [d if isinstance(d, int) else 77 for d in spec.shape]
        feeds[spec.name] = (np.full(shape, 500.0, np.float32) if spec.name == "timestep"
                            else np.zeros(shape, np.float32) if "residual" in spec.name
                            else rng.standard_normal(shape).astype(np.float32))
    profile_dir = Path(tempfile.mkdtemp(prefix="unet-profile-"))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / "ort")
    if variant:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # warm-up, profiled too: left out below
    for _ in range(args.runs):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())

    runs = [event for event in trace if event.get("cat") == "Session" and event.get("name") == "model_run"]
    per_run: list[dict[str, float]] = []
    counts: dict[str, int] = defaultdict(int)
    for index, run in enumerate(runs[1:], 1):  # skip the warm-up
        start, end = run["ts"], run["ts"] + run["dur"]
        totals: dict[str, float] = defaultdict(float)
        for event in trace:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and start <= event["ts"] <= end:
                op = event.get("args", {}).get("op_name", "?")
                totals[op] += event["dur"] / 1e3
                if index == 1:
                    counts[op] += 1
        per_run.append(totals)
    run_ms = [run["dur"] / 1e3 for run in runs[1:]]
    ops = sorted({op for totals in per_run for op in totals}, key=lambda op: -np.median([t.get(op, 0.0) for t in per_run]))
    rows = [{"op": op, "group": GROUPS.get(op, "elementwise and other"), "nodes": counts[op],
             "ms": float(np.median([t.get(op, 0.0) for t in per_run]))} for op in ops]
    total = float(np.median(run_ms))
    groups: dict[str, float] = defaultdict(float)
    for row in rows:
        groups[row["group"]] += row["ms"]
    flops = manifest.data["components"][args.component].get("flops", {}).get("per_call")
    report = {"engine": str(args.engine), "graph": graph.name, "runs": args.runs, "run_ms_median": total,
              "kernel_ms_sum": sum(r["ms"] for r in rows), "flops_per_call": flops,
              "onnxruntime": ort.__version__, "ops": rows, "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]))}
    print(f"{graph.name}: {total:.0f} ms per call (median of {args.runs}); kernels sum to {report['kernel_ms_sum']:.0f} ms")
    print("\n| group | ms | share |\n|---|---:|---:|")
    for group, ms in report["groups"].items():
        print(f"| {group} | {ms:.0f} | {100 * ms / total:.1f}% |")
    print("\n| op | nodes | ms | share |\n|---|---:|---:|---:|")
    for row in rows[:15]:
        print(f"| {row['op']} | {row['nodes']} | {row['ms']:.1f} | {100 * row['ms'] / total:.1f}% |")
    if flops:
        print(f"\n{flops / 1e9:.0f} GFLOP per call (direct convolution count): {flops / 1e9 / (total / 1e3):.0f} effective GFLOP/s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
