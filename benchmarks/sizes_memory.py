"""Peak memory and step time of an engine dir with several image sizes, against a single-size one.

    python benchmarks/sizes_memory.py ENGINE_DIR [--at 512x512,768x512] [--steps 2] [--json out.json]

Loads every size of ENGINE_DIR (Pipeline.load makes a session per size), then generates one image at each size of
``--at`` (default: the engine dir's first), and prints the process's peak RSS (getrusage), its RSS after each image
and the median U-Net step per size. Run each engine dir in its own process: peak RSS is per process. The issue's
bound: with five sizes loaded, at most 1.15 x the peak of a single-size engine dir at the same size.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path)
    parser.add_argument("--at", help="sizes to generate at, WxH comma-separated (default: the engine dir's default)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from sdfast.bench.measure import rss_mib
    from sdfast.runtime.pipeline import GenerationRequest, Pipeline

    started = time.perf_counter()
    pipeline = Pipeline.load(args.engine, verify="size")
    load_s = time.perf_counter() - started
    sizes = [tuple(int(v) for v in text.split("x")) for text in args.at.split(",")] if args.at else [pipeline.manifest.sizes[0]]
    record = {"engine": str(args.engine), "sizes_loaded": pipeline.manifest.sizes_text, "load_s": round(load_s, 2),
              "rss_after_load_mib": round(rss_mib()), "images": []}
    print(f"loaded {record['sizes_loaded']} in {load_s:.1f} s, RSS {record['rss_after_load_mib'] / 1024:.2f} GiB", flush=True)
    for width, height in sizes:
        result = pipeline.generate(GenerationRequest("a lighthouse on a cliff", steps=args.steps, seed=1, width=width, height=height,
                                                     sampler="euler"))
        step = statistics.median(result.timings.unet_steps)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record["images"].append({"size": f"{width}x{height}", "unet_step_median_s": round(step, 3), "rss_after_mib": round(rss_mib()),
                                 "peak_rss_so_far_mib": round(peak)})
        print(f"{width}x{height}: U-Net step median {step:.2f} s, RSS after {rss_mib() / 1024:.2f} GiB, peak so far {peak / 1024:.2f} GiB",
              flush=True)
    record["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"peak RSS {record['peak_rss_mib'] / 1024:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
