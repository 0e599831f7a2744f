"""Peak RSS of one engine component under onnxruntime session settings, each setting in a fresh process.

    python benchmarks/memory_probe.py ENGINE_DIR [--component unet] [--calls 1] \
        --config default --config portable --config prepack=off --config arena=off,prepack=off

A config is comma-separated keys: ``portable`` (the portable graph, optimized at load, instead of the export's CPU
variant), ``prepack=off`` (``session.disable_prepacking``), ``arena=off`` (no CPU memory arena),
``pattern=off`` (no memory-pattern planning), ``initializers=device`` (initializers from the device allocator),
``level=basic|extended|all`` (onnxruntime's optimization level at load; the portable graph's default is all).
Each line gives the weights' bytes on disk, RSS after load, peak RSS after the calls, and the ratios to the weights:
what `generate` costs beyond the weights it loads, per lever.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sdfast.bench.measure import rss_mib


def probe(engine_dir: Path, component: str, config: str, calls: int) -> dict:
    """Load ``component`` with ``config``'s settings in this process, run it ``calls`` times; sizes in MiB."""
    import onnxruntime as ort

    from sdfast.runtime.backends import get_backend
    from sdfast.runtime.manifest import read_manifest

    keys = {key for key in config.split(",") if key and key != "default"}
    manifest = read_manifest(engine_dir)
    info = manifest.components[component]
    backend = get_backend("cpu")
    file, files = (info.file, info.files) if "portable" in keys else backend.graph_for(info)  # the variant where usable
    use_variant = file != info.file
    options = backend.session_options(optimize=not use_variant)
    for level in ("basic", "extended", "all"):
        if f"level={level}" in keys:
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
    if "prepack=off" in keys:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if "arena=off" in keys:
        options.enable_cpu_mem_arena = False
    if "pattern=off" in keys:
        options.enable_mem_pattern = False
    if "initializers=device" in keys:
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    weights = sum(entry["bytes"] for entry in files.values()) / 2**20
    base = rss_mib()
    started = time.perf_counter()
    session = ort.InferenceSession(str(engine_dir / file), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - started
    loaded = rss_mib()
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in info.inputs:
        shape = [d if isinstance(d, int) else 77 for d in spec.shape]  # a dynamic axis (prompt tokens): one chunk
        feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype) if spec.dtype.startswith("float") else np.ones(shape, spec.dtype)
    call_s = []
    for _ in range(calls):
        started = time.perf_counter()
        session.run(None, feeds)
        call_s.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": config, "graph": "cpu variant" if use_variant else "portable", "weights_mib": round(weights),
            "python_mib": round(base), "after_load_mib": round(loaded), "peak_mib": round(peak),
            "load_ratio": round((loaded - base) / weights, 3), "peak_ratio": round(peak / weights, 3),
            "load_s": round(load_s, 1), "call_s": [round(s, 2) for s in call_s]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--component", default="unet")
    parser.add_argument("--config", action="append", default=[], help="see the module docstring; repeatable")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(probe(args.engine, args.component, args.child, args.calls)))
        return 0
    rows = []
    for config in args.config or ["default"]:
        done = subprocess.run([sys.executable, __file__, str(args.engine), "--component", args.component,
                               "--calls", str(args.calls), "--child", config], capture_output=True, text=True)
        if done.returncode:
            print(f"{config}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| config | graph | weights MiB | RSS after load MiB | peak RSS MiB | peak / weights | load s | call s |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['config']} | {r['graph']} | {r['weights_mib']} | {r['after_load_mib']} | {r['peak_mib']} | "
              f"{r['peak_ratio']} | {r['load_s']} | {', '.join(map(str, r['call_s']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
