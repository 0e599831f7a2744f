"""Per-stage latency of an engine dir on the lean runtime: load, text encoder, U-Net step, VAE decode.

    python benchmarks/stage_latency.py ENGINE_DIR [--repeat 5] [--backend cpu] [--json benchmarks/results/NAME.json]

Each stage runs once to warm up, then --repeat times; the table gives median, min, max and std in ms.
Kept to re-run the figures recorded with it; `sdfast bench` supersedes it (every backend, p90, cold start, FLOP/s).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sdfast.bench.hardware import CpuInfo
from sdfast.runtime.pipeline import Pipeline


def time_stage(run, repeat: int) -> dict[str, float]:
    run()  # warm-up
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e3)
    return {
        "median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
        "std_ms": statistics.stdev(samples) if len(samples) > 1 else 0.0, "repeat": repeat,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    started = time.perf_counter()
    pipeline = Pipeline.load(args.engine_dir, backend=args.backend, verify="size")
    load_s = time.perf_counter() - started
    geometry = pipeline.manifest.geometry
    rng = np.random.default_rng(0)
    engines = pipeline.engines

    def shape_of(info, spec) -> tuple[int, ...]:  # a dynamic axis (the prompt's tokens) at its smallest: one 77-token chunk
        return tuple(info.dynamic[d].min if isinstance(d, str) else d for d in spec.shape)

    feeds = {name: {s.name: (rng.integers(0, 1000, shape_of(engine.info, s)) if s.dtype == "int64" else rng.standard_normal(shape_of(engine.info, s)))
                    for s in engine.info.inputs}
             for name, engine in engines.items()}
    feeds["unet"]["timestep"] = np.full(feeds["unet"]["timestep"].shape, 500.0)
    feeds["text_encoder"]["clip_skip"] = np.ones(1, dtype=np.int64)
    stages = {}
    for name, label in (("text_encoder", "text encoder"), ("unet", "U-Net step"), ("vae_decoder", "VAE decode")):
        print(f"timing {label} ...", file=sys.stderr, flush=True)
        stages[name] = time_stage(lambda: engines[name].run(feeds[name]), args.repeat)

    print(f"\n{pipeline.manifest.model_name} {geometry['width']}x{geometry['height']}, batch {geometry['batch']}, "
          f"U-Net batch {geometry['unet_batch']}, {pipeline.manifest.data['precision']}, backend {args.backend}; load {load_s:.2f} s")
    print(f"{'stage':<14}{'median ms':>11}{'min':>9}{'max':>9}{'std':>8}")
    for name, figures in stages.items():
        print(f"{name:<14}{figures['median_ms']:>11.1f}{figures['min_ms']:>9.1f}{figures['max_ms']:>9.1f}{figures['std_ms']:>8.1f}")
    if args.json:
        import onnxruntime

        record = {
            "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": CpuInfo.detect().name, "cores": os.cpu_count(), "platform": platform.platform()},
            "versions": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": platform.python_version()},
            "engine": {"model": pipeline.manifest.model_name, **geometry, "precision": pipeline.manifest.data["precision"]},
            "backend": args.backend, "load_s": load_s, "stages": stages,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
